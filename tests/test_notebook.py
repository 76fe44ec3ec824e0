"""examples/icemap-quickstart.ipynb runs from top to bottom, fast, in this interpreter.

The notebook is executed by nbclient with a kernel spec written for the current interpreter,
so it tests the icemap installed here (not whatever a system Jupyter would pick). Any cell
error fails the test; it is never skipped.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "icemap-quickstart.ipynb"
KERNEL = "icemap-test-python"

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def _kernel_spec(folder: Path) -> Path:
    """A Jupyter data dir holding one kernel spec: this interpreter running ipykernel."""
    spec = folder / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "icemap test kernel",
        "language": "python",
    }))
    return folder


def test_quickstart_notebook_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    # Committed without outputs: results in git would go stale and bloat diffs.
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")

    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path / "jupyter")))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    client = NotebookClient(nb, kernel_name=KERNEL, timeout=120, allow_errors=False,
                            resources={"metadata": {"path": str(run_dir)}})
    start = time.monotonic()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.monotonic() - start

    outputs = "\n".join(
        o.get("text", "") + json.dumps(o.get("data", {}).get("text/plain", ""))
        for c in nb.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "Traceback" not in outputs
    assert "'f1'" in outputs and "ice_area_km2" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert (run_dir / "icemap-quickstart" / "cube.zarr" / "zarr.json").exists()
    assert (run_dir / "icemap-quickstart" / "quicklook.png").stat().st_size > 1000
    assert elapsed < 60 * 3  # < 60 s on an idle 2-core machine; margin for a busy one
