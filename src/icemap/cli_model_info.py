"""The ``icemap model`` command group and ``icemap model info`` (registered on :data:`icemap.cli.app`).

The product side of the model commands: inspecting a model folder needs only the network
runtime (:mod:`icemap.model.checkpoint`, :mod:`icemap.infer`). ``icemap model import`` is the
lab's (:mod:`icemap.lab.cli`), which registers it on :data:`model_app`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from icemap.cli_common import _console, app, safe
from icemap.redact import printable

# -- icemap model ...: import a network trained elsewhere, inspect a model folder -------------------
model_app = typer.Typer(name="model", help="Import a network trained elsewhere (ONNX); inspect a model folder.",
                        no_args_is_help=True)
app.add_typer(model_app, name="model")


@model_app.command("info")
def model_info_cmd(
    folder: Annotated[Path, typer.Argument(help="Model folder (icemap train or icemap model import).", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Print model.json as JSON.")] = False,
) -> None:
    """Show what a model folder holds: kind, inputs, normalisation, threshold, tiling, checksum."""
    from icemap.model.checkpoint import read_metadata

    meta = read_metadata(folder)
    con = _console(stderr=False)
    if as_json:
        con.print(printable(meta.to_json()), highlight=False, markup=False)
        return
    a = meta.architecture
    if meta.kind == "onnx":
        net = (f"ONNX ({a.get('producer') or 'unknown producer'}, opset {a.get('opset')}), {a.get('output_kind')} "
               f"output; multiple {a.get('multiple')} px, halo {a.get('halo')} px ({a.get('halo_source')})")
    else:
        from icemap.infer import model_context

        depth, halo = model_context(meta)
        net = ", ".join(f"{k} {v}" for k, v in a.items())
        net = f"icemap U-Net ({net}); multiple {2**depth} px, halo {halo} px (from the architecture)"
    norm = meta.normalisation
    lines = [("model", str(folder)), ("network", net), ("channels", ", ".join(meta.channels)),
             ("bands", ", ".join(meta.bands)),
             ("normalisation", f"{norm.get('method')}: lo {norm.get('lo')}, hi {norm.get('hi')}"),
             ("threshold", f"{meta.threshold:g}"), ("weights", f"{meta.weights_file}, sha256 {meta.weights_sha256}")]
    if meta.validation:
        lines.append(("validation", ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                               for k, v in meta.validation.items())))
    for key, value in lines:
        con.print(f"[bold]{key}[/]: {safe(value)}", highlight=False)
