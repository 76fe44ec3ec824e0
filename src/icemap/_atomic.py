"""Atomic file writes: the one home of "temporary file beside the target, then rename".

Every file icemap writes for a user (COGs, tables, outlines, figures, reports, JSON, checkpoints)
appears whole or not at all: a reader, a glob or a resumed run never sees half a file, and an
existing file is replaced only once the new one is complete. The temporary file lives in the
target's own folder because :func:`os.replace` is atomic only within one file system; its name
starts with a dot and carries ``.tmp`` so that globbing for the product (``*.tif``) skips it and
:func:`icemap.sample` can clear what an interrupted run left.

Only the standard library is imported here: ``import icemap`` stays light.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "temp_name"]


def temp_name(path: str | os.PathLike[str], suffix: str | None = None) -> Path:
    """A unique hidden temporary name beside ``path``: ``.<stem>.<pid>.<random>.tmp<suffix>``.

    Parameters
    ----------
    path
        The file the temporary one will replace.
    suffix
        Appended after ``.tmp``; default the target's own suffix, because GDAL and pandas pick
        the format (GeoPackage, Parquet...) by it. Pass ``""`` where the writer is told its
        format explicitly and the name must not match a glob for the product.
    """
    path = Path(path)
    suffix = path.suffix if suffix is None else suffix
    # pid and random part: two processes (or threads) writing the same target never share one.
    return path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp{suffix}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, suffix: str | None = None, fsync: bool = False,
                side_files: Sequence[str] = ()) -> Iterator[Path]:
    """Give a temporary path to write; on success it replaces ``path``, on failure it is removed.

    Parameters
    ----------
    path
        The file to write. Its folder must exist.
    suffix
        Suffix of the temporary file (see :func:`temp_name`).
    fsync
        Flush the temporary file to disk before the rename, so that a crash right after cannot
        leave an empty file under the final name (for files that are costly to lose).
    side_files
        Suffixes of files a failed writer may leave beside the temporary one (SQLite's
        ``-journal``, ``-wal``, ``-shm`` for GeoPackages); removed on failure too.

    Yields
    ------
    pathlib.Path
        The temporary path; write the whole file there inside the ``with`` block.

    Examples
    --------
    >>> with atomic_path("areas.csv") as tmp:  # doctest: +SKIP
    ...     table.to_csv(tmp, index=False)
    """
    target = Path(path)
    tmp = temp_name(target, suffix)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        for extra in side_files:
            Path(f"{tmp}{extra}").unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      fsync: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`); return the path."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
    return Path(path)
