"""What every ``icemap`` command shares: the typer app, option types, console, progress bar.

:mod:`icemap.cli` (data commands), :mod:`icemap.cli_model_info`, :mod:`icemap.cli_report` and the lab's
:mod:`icemap.lab.cli` all register on :data:`app` from here, so none imports another's module for it
(no import cycle).
Options whose default is an icemap default (chunk size, threshold, Zarr format...) default to
``None`` ("not given") and are resolved by the library through :mod:`icemap.options`, so the CLI
never restates a default.
"""

from __future__ import annotations

import errno as _errno
import warnings
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from icemap._version import __version__
from icemap.redact import printable, redact

app = typer.Typer(
    name="icemap",
    help="Map glacier ice from Landsat 8/9 Collection 2 imagery: search, ingest, map, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"icemap {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print icemap's version and exit.")] = False,
) -> None:
    """Map glacier ice from Landsat 8/9 Collection 2 imagery: search, ingest, map, evaluate."""


Catalog = Annotated[
    str,
    typer.Option("--catalog", "-c", help="STAC API URL, catalog.json, item file(s) folder or .ndjson."),
]
CollectionOpt = Annotated[
    Optional[list[str]], typer.Option("--collection", help="Collection id (repeatable), e.g. landsat-c2-l2.")
]
IntersectsOpt = Annotated[
    Optional[Path],
    typer.Option("--intersects", help="GeoJSON file (lon/lat) of the area, instead of --bbox: items meeting it."),
]
BboxOpt = Annotated[
    Optional[tuple[float, float, float, float]],
    typer.Option("--bbox", help="WEST SOUTH EAST NORTH in degrees.", min=None),
]
DatetimeOpt = Annotated[Optional[str], typer.Option("--datetime", help="START/END (ISO 8601; '..' for open).")]
MaxCloudOpt = Annotated[Optional[float], typer.Option("--max-cloud", help="Maximum scene cloud cover, %.")]
PlatformOpt = Annotated[Optional[list[str]], typer.Option("--platform", help="landsat-8 or landsat-9 (repeatable).")]
SchedulerOpt = Annotated[
    Optional[str],
    typer.Option("--scheduler", help="Where to compute: local, local-cuda, auto, a scheduler address (tcp://host:8786), "
                 "gateway, gateway+https://GATEWAY-URL or gateway://PROXY:PORT/CLUSTER (see deploy/README.md)."),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress display.")]
RetriesOpt = Annotated[int, typer.Option("--retries", help="Retries of failed/timed-out/5xx STAC requests.")]
TimeoutOpt = Annotated[float, typer.Option("--timeout", help="Seconds to wait for each STAC request.")]
BackoffOpt = Annotated[float, typer.Option("--backoff", help="Backoff factor of the STAC retries: BACKOFF * 2**(n-1) seconds before the n-th retry, none before the first.")]


def _console(stderr: bool = True) -> Any:
    from rich.console import Console

    # soft_wrap: never break messages mid-line when output goes to a file or a log.
    return Console(stderr=stderr, soft_wrap=True)


def safe(text: Any, *, one_line: bool = False) -> str:
    """Text from data, paths or exceptions, ready for a rich console: shown, never interpreted.

    Secrets redacted (:func:`icemap.redact.redact`), terminal control characters removed
    (:func:`icemap.redact.printable`: ESC sequences, OSC 8 hyperlinks) and rich markup escaped
    (an item id ``[link=...]x[/link]`` or a model name ``[bold]`` prints as written). Every
    string the CLI prints that it did not write itself goes through here.
    """
    from rich.markup import escape

    return escape(printable(redact(text), one_line=one_line))


def _split_list(values: list[str] | None) -> list[str] | None:
    """Accept ``--bands green --bands swir16`` and ``--bands green,swir16`` alike."""
    if not values:
        return None
    out: list[str] = []
    for v in values:
        out.extend(p for p in v.replace(",", " ").split() if p)
    return out


class _StepProgress:
    """A rich progress bar fed by ``progress(done, total, label)`` callbacks.

    It also remembers which store the command writes (``out``) and which steps it has
    finished, so an interrupted command can say where it stopped (:func:`interrupted_line`).
    """

    def __init__(self, quiet: bool, title: str, out: str | None = None) -> None:
        self.quiet = quiet
        self.title = title
        self.out = out
        self.done: list[str] = []
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> Any:
        global _ACTIVE
        _ACTIVE = self
        if self.quiet:
            return self
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[label]}"), TimeElapsedColumn(), console=_console(), transient=False,
        )
        self._progress.start()
        return self

    def __call__(self, done: int, total: int, label: str) -> None:
        self.done.append(label)
        if self._progress is None:
            return
        if self._task is None:
            self._task = self._progress.add_task(self.title, total=total, label=label)
        self._progress.update(self._task, completed=done, total=total, label=label)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()


#: The write under way (kept after it ends, so an interrupt during its unwinding still finds it).
_ACTIVE: _StepProgress | None = None


def interrupted_line(signal_name: str) -> str:
    """One line for an interrupted command: which steps of its store are complete, and how to resume.

    The store's own flags are read (they, not the progress bar, decide what a rerun redoes);
    if it cannot be read, the steps this run finished are named instead.
    """
    active = _ACTIVE
    if active is None or active.out is None:
        return f"icemap: interrupted ({signal_name}); nothing was being written; rerun the same command"
    try:
        from icemap.store import cube_status

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = cube_status(active.out)
        complete = [t for t, c in zip(status.times, status.complete) if c]
        total = len(status.times)
    except Exception:  # noqa: BLE001 - a store interrupted before its layout has no status yet
        complete, total = list(active.done), None
    shown = ", ".join(complete[:4]) + (" ..." if len(complete) > 4 else "")
    of = f" of {total}" if total is not None else ""
    return (f"icemap: interrupted ({signal_name}) during {active.title}: {active.out} has {len(complete)}{of} "
            f"step(s) complete{f' ({shown})' if complete else ''}; rerun the same command to resume")


_ERRNO_ADVICE = {
    "ENOSPC": "the disk is full; free space or choose another --out",
    "EDQUOT": "the disk quota is exhausted; free space or choose another --out",
    "EROFS": "the file system is read-only; choose a writable --out",
    "EACCES": "permission denied; choose a folder you may write to, or fix its permissions",
    "EPERM": "operation not permitted; choose a folder you may write to",
    "ENOENT": "no such file or folder; check the path (its parent folder must exist)",
    "EISDIR": "it is a folder where a file was expected",
    "ENOTDIR": "a part of the path is a file, not a folder",
}


def os_error_line(exc: OSError) -> str:
    """An operating-system error as one line that names the path and what to do.

    Zarr, GDAL and pandas raise these from deep inside a write (a full disk, a read-only
    mount); the traceback says nothing a user can act on, the path and the errno do.
    """
    name = _errno.errorcode.get(exc.errno or -1, "")
    what = _ERRNO_ADVICE.get(name) or (exc.strerror or str(exc) or type(exc).__name__)
    paths = [p for p in (exc.filename, exc.filename2) if p is not None]
    where = " -> ".join(str(p) for p in paths)
    text = f"{where}: {what}" if where else f"{what} ({type(exc).__name__}: {exc})"
    return redact(text)
