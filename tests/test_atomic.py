"""The one atomic writer: a file appears whole or not at all, and a failed write leaves nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from icemap._atomic import atomic_path, atomic_write_bytes, atomic_write_text, temp_name


def test_success_replaces_the_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "areas.csv"
    target.write_text("old\n")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".areas.") and tmp.suffix == ".csv"
        tmp.write_text("new\n")
        assert target.read_text() == "old\n"  # the old file stays until the new one is complete
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["areas.csv"]


def test_failure_keeps_the_old_file_and_removes_temporary_and_side_files(tmp_path: Path) -> None:
    target = tmp_path / "outlines.gpkg"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="driver failed"):
        with atomic_path(target, side_files=("-journal", "-wal")) as tmp:
            tmp.write_bytes(b"half")
            Path(f"{tmp}-journal").write_bytes(b"j")
            raise RuntimeError("driver failed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outlines.gpkg"]


def test_writer_that_never_creates_the_file_is_an_error_and_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x.json"):
            pass
    assert list(tmp_path.iterdir()) == []


def test_bytes_and_text_helpers(tmp_path: Path) -> None:
    assert atomic_write_bytes(tmp_path / "w.safetensors", b"\x00\x01", fsync=True).read_bytes() == b"\x00\x01"
    assert atomic_write_text(tmp_path / "r.html", "é\n").read_text(encoding="utf-8") == "é\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.html", "w.safetensors"]


def test_temporary_names_are_hidden_unique_and_can_drop_the_suffix(tmp_path: Path) -> None:
    a, b = temp_name(tmp_path / "ice.tif"), temp_name(tmp_path / "ice.tif")
    assert a != b and a.name.startswith(".ice.") and str(os.getpid()) in a.name
    assert a.suffix == ".tif"
    assert temp_name(tmp_path / "ice.tif", suffix="").name.endswith(".tmp")  # never matches *.tif
