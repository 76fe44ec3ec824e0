"""The README's two commands are what CI runs, and `import icemap` stays light."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from .conftest import REPO


def _readme_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)[:2]


def test_ci_runs_the_readme_commands() -> None:
    install, tests = _readme_commands()
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert install.strip() in ci
    assert tests.strip() in ci
    assert "pytest" in tests


@pytest.mark.parametrize("module", ["icemap", "icemap.cli"])
def test_import_is_light(module: str) -> None:
    """`import icemap` and the CLI's start load none of the heavy stacks: a command pays for what it uses
    (a module-level import of a stage module in the CLI, even for a constant, would load them all)."""
    code = (
        f"import sys, {module}; "
        "heavy = [m for m in ('torch', 'matplotlib', 'dask', 'xarray', 'stackstac', 'rasterio', 'zarr') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_resolves_lazily() -> None:
    import icemap

    for name in icemap.__all__:
        assert getattr(icemap, name) is not None


def test_public_functions_win_over_same_named_submodules() -> None:
    # `icemap.load` and `icemap.quicklook` are functions living in modules of the same name;
    # importing those modules must not replace the functions on the package.
    code = ("import icemap, icemap.load, icemap.quicklook; "
            "assert callable(icemap.load) and callable(icemap.quicklook), (icemap.load, icemap.quicklook)")
    subprocess.run([sys.executable, "-c", code], check=True)
