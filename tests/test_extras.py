"""Missing optional dependencies are reported at once, before any work, in one line.

The import of safetensors (or torch) is made to fail in the subprocess with a
``sitecustomize`` whose import hook raises ModuleNotFoundError for it, as a missing package does
(``sys.modules[name] = None`` would leave a None there that other libraries trip over, e.g.
scipy's array-API helpers look torch up in sys.modules): the packages stay installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO


def _run_without(module: str, args: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n"
        "class _Missing:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name == {module!r} or name.startswith({module + '.'!r}):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _Missing())\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "icemap.cli", *args], capture_output=True, text=True,
                         timeout=120, env=env, cwd=REPO)
    return out, time.monotonic() - t0


@pytest.mark.parametrize("module", ["safetensors", "torch"])
@pytest.mark.parametrize("command", [
    ["train", "--cube", "nowhere.zarr", "--reference", "nowhere.gpkg", "--out", "model"],
    ["experiment", "--cube", "nowhere.zarr", "--reference", "nowhere.gpkg", "--out", "runs"],
    ["map", "--cube", "nowhere.zarr", "--out", "ice.zarr", "--method", "unet", "--model", "model"],
], ids=["train", "experiment", "map-unet"])
def test_missing_ml_extra_is_named_first(module: str, command: list[str], tmp_path: Path) -> None:
    out, seconds = _run_without(module, command, tmp_path)
    assert out.returncode == 1, out.stderr
    # Before the paths are even checked (they do not exist): the extra is the first problem named.
    assert 'pip install "icemap[ml]"' in out.stderr and module in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists() and seconds < 60


def test_ndsi_map_does_not_need_the_ml_extra(tmp_path: Path) -> None:
    out, _ = _run_without("torch", ["map", "--cube", str(tmp_path / "none.zarr"), "--out", str(tmp_path / "o.zarr")],
                          tmp_path)
    assert out.returncode == 1 and "icemap[ml]" not in out.stderr and "no Zarr store" in out.stderr
