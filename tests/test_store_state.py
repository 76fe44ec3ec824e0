"""A stateful test of the stores (Hypothesis ``RuleBasedStateMachine``, as zarr-python tests its own).

Random sequences of ingest, append (new dates), map, composite, interrupted writes and reruns
with changed settings run on tiny in-memory cubes (8 x 8 px, two bands), in-process, and after
every step the stores are checked against a model of what they must hold: which steps are
complete, which settings they record, which changes are refused, and the pixels of every
complete step.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
import zarr
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import icemap
from icemap.errors import StoreError, StoreWarning
from icemap.interop import decode_attrs
from icemap.store import _fmt_time

SEASON = "02-01/03-31"
DATES = ("2021-02-05", "2021-02-20", "2022-02-10", "2022-02-25", "2023-03-01")
N = 8


def _cube(dates: list[str]) -> Any:
    """A cube of the given dates; each date's pixels depend on the date only (a rerun writes the same)."""
    import rioxarray  # noqa: F401

    dates = sorted(dates)
    refl = np.stack([np.random.default_rng(DATES.index(d)).uniform(0.02, 0.9, (2, N, N)).astype(np.float32)
                     for d in dates])
    refl[:, :, 0, 0] = np.nan  # a gap in every date
    ds = xr.Dataset(
        {"reflectance": (("time", "band", "y", "x"), refl),
         "qa_pixel": (("time", "y", "x"), np.full((len(dates), N, N), 21824, np.uint16))},
        coords={"time": np.array(dates, "datetime64[ns]"), "band": ["green", "swir16"],
                "y": 7000015.0 - 30.0 * np.arange(N), "x": 500015.0 + 30.0 * np.arange(N),
                "item_ids": ("time", np.array([f"scene-{d}" for d in dates], dtype=object))},
    )
    return ds.rio.write_crs("EPSG:32633").chunk({"time": 1, "y": 8, "x": 8})


class Boom(Exception):
    """A write stopped part-way (the process killed, the disk gone)."""


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="icemap-state-"))
        self.cube, self.product, self.comp = self.root / "c.zarr", self.root / "p.zarr", self.root / "k.zarr"
        # The model: dates in the cube (complete or not), per store its settings and complete steps.
        self.cube_dates: set[str] = set()
        self.cube_done: set[str] = set()
        self.cube_qa: str | None = None
        self.prod_threshold: float | None = None
        self.prod_done: set[str] = set()
        self.comp_rule: str | None = None
        self.comp_years: dict[int, list[str]] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- rules -----------------------------------------------------------------------------------

    @initialize(dates=st.sets(st.sampled_from(DATES), min_size=1, max_size=3))
    def first_ingest(self, dates: set[str]) -> None:
        report = icemap.write_cube(_cube(list(dates)), self.cube, chunksize=8, settings={"qa": "qa_pixel"})
        assert report.created
        self.cube_dates |= dates
        self.cube_done |= dates
        self.cube_qa = "qa_pixel"

    @rule(dates=st.sets(st.sampled_from(DATES), min_size=1, max_size=5), stop=st.sampled_from(["none", "after-first",
                                                                                              "mid-step"]))
    def ingest_or_append(self, dates: set[str], stop: str) -> None:
        pending = sorted(d for d in dates if d not in self.cube_done)
        with self._stopped(stop) as stopping:
            report = icemap.write_cube(_cube(list(dates)), self.cube, chunksize=8, settings={"qa": "qa_pixel"})
        self.cube_dates |= dates
        if stopping.stopped:
            flags = self._flags(self.cube)
            if stop == "after-first":
                assert flags == self.cube_done | {pending[0]}
            else:  # a step's chunk failed: nothing newly flagged can be half written (checked below)
                assert self.cube_done <= flags <= self.cube_done | set(pending)
            self.cube_done = flags
        else:
            assert sorted(report.written) == [_fmt_time(np.datetime64(d)) for d in pending]
            self.cube_done |= dates

    @rule()
    def ingest_with_other_settings(self) -> None:
        before = self._flags(self.cube)
        with pytest.raises(StoreError, match=r"qa null \(stored: \"qa_pixel\"\).*another --out"):
            icemap.write_cube(_cube(sorted(self.cube_dates)), self.cube, chunksize=8, settings={"qa": None})
        assert self._flags(self.cube) == before

    @precondition(lambda self: bool(self.cube_done))
    @rule(threshold=st.sampled_from([0.4, 0.1]), stop=st.sampled_from(["none", "after-first"]))
    def map(self, threshold: float, stop: str) -> None:
        if self.prod_threshold is not None and threshold != self.prod_threshold:
            before = self._flags(self.product)
            with pytest.raises(StoreError, match=rf"threshold {threshold} \(stored: {self.prod_threshold}\)"):
                icemap.map_cube(self.cube, self.product, threshold=threshold)
            assert self._flags(self.product) == before
            return
        pending = sorted(self.cube_done - self.prod_done)
        with self._stopped(stop) as stopping, warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)  # the cube's incomplete steps are named
            icemap.map_cube(self.cube, self.product, threshold=threshold,
                            progress=stopping.progress if stop != "none" else None)
        self.prod_threshold = threshold
        self.prod_done |= {pending[0]} if stopping.stopped else set(pending)

    @precondition(lambda self: bool(self.cube_done))
    @rule(rule_name=st.sampled_from(["min-ndsi", "latest"]))
    def composite(self, rule_name: str) -> None:
        if self.comp_rule is not None and rule_name != self.comp_rule:
            with pytest.raises(StoreError, match=rf'rule "{rule_name}" \(stored: "{self.comp_rule}"\)'):
                icemap.composite(self.cube, self.comp, season=SEASON, rule=rule_name)  # type: ignore[arg-type]
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)
            years = {y: sorted(d for d in self.cube_done if int(d[:4]) == y) for y in {int(d[:4]) for d in self.cube_done}}
            changed = {y for y, ds in years.items() if self.comp_years.get(y) not in (None, ds)}
            report = icemap.composite(self.cube, self.comp, season=SEASON, rule=rule_name)  # type: ignore[arg-type]
            # Years that gained dates are computed again; unchanged years are kept.
            again = {int(t[:4]) for t in report.written} - {y for y in years if y not in self.comp_years}
            assert again == changed
            self.comp_rule = rule_name
            self.comp_years.update(years)
            fresh = icemap.composite(icemap.open_cube(self.cube), season=SEASON, rule=rule_name).compute()  # type: ignore[arg-type]
            stored = icemap.open_cube(self.comp)
        for y in years:
            t = np.datetime64(f"{y}-03-31")
            np.testing.assert_array_equal(stored["reflectance"].sel(time=t).values,
                                          fresh["reflectance"].sel(time=t).values)

    # -- the model checked -------------------------------------------------------------------------

    @invariant()
    def stores_match_the_model(self) -> None:
        if not self.cube.exists():
            return
        group = zarr.open_group(str(self.cube), mode="r")
        attrs = decode_attrs(group.attrs)  # dict attributes are JSON text on disk
        assert sorted(str(t)[:10] for t in xr.open_zarr(self.cube, consolidated=False)["time"].values) == sorted(
            self.cube_dates)
        assert self._flags(self.cube) == self.cube_done
        assert attrs["icemap:settings"] == {"qa": self.cube_qa}
        assert "icemap:store" in attrs
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", StoreWarning)
            shown = icemap.open_cube(self.cube)
        assert sorted(str(t)[:10] for t in shown["time"].values) == sorted(self.cube_done)
        expected = _cube(sorted(self.cube_done))
        np.testing.assert_array_equal(shown["reflectance"].values, expected["reflectance"].values)
        if self.product.exists():
            assert self._flags(self.product) == self.prod_done
            recorded = decode_attrs(zarr.open_group(str(self.product), mode="r").attrs)["icemap:settings"]
            assert recorded["threshold"] == self.prod_threshold and recorded["method"] == "ndsi"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", StoreWarning)
                product = icemap.open_cube(self.product)
            want = icemap.map_ndsi(expected.sel(time=product["time"].values), threshold=self.prod_threshold)
            np.testing.assert_array_equal(product["ice"].values, want["ice"].values)
        if self.comp.exists():
            attrs = decode_attrs(zarr.open_group(str(self.comp), mode="r").attrs)
            assert attrs["icemap:settings"]["rule"] == self.comp_rule
            inputs = {t[:4]: sorted(d[:10] for d in v) for t, v in attrs["icemap:step_inputs"].items()}
            assert inputs == {str(y): d for y, d in self.comp_years.items()}
        assert not Path(str(self.cube) + ".icemap-lock").exists()

    # -- helpers -----------------------------------------------------------------------------------

    @staticmethod
    def _flags(path: Path) -> set[str]:
        group = zarr.open_group(str(path), mode="r")
        times = xr.open_zarr(path, consolidated=False)["time"].values
        return {str(t)[:10] for t, c in zip(times, group["complete"][:]) if c}

    @contextlib.contextmanager
    def _stopped(self, stop: str) -> Any:
        """Stop a write after its first step (``after-first``) or inside a step (``mid-step``)."""
        import icemap.store as store

        class Stop:
            stopped = False

            @staticmethod
            def progress(done: int, total: int, label: str) -> None:
                raise Boom()

        state = Stop()
        real = store._store_block
        calls = [0]

        def failing(block: Any, target: Any, index: int, block_info: Any = None) -> Any:
            calls[0] += 1
            if calls[0] == 3:  # the third chunk written fails
                raise Boom()
            return real(block, target, index, block_info=block_info)

        if stop == "mid-step":
            store._store_block = failing
        try:
            if stop == "after-first":
                real_write = store.write_timesteps

                def with_progress(*args: Any, **kwargs: Any) -> Any:
                    kwargs["progress"] = state.progress
                    return real_write(*args, **kwargs)

                store.write_timesteps = with_progress
            yield state
        except Boom:
            state.stopped = True
        finally:
            store._store_block = real
            if stop == "after-first":
                store.write_timesteps = real_write


StoreMachine.TestCase.settings = settings(max_examples=4, stateful_step_count=4, deadline=None,
                                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
test_store_state_machine = StoreMachine.TestCase
