"""icemap.set_options: one validated home for defaults, honoured by the functions that use them."""

from __future__ import annotations

import numpy as np
import pytest

import icemap
from icemap.errors import IcemapError
from icemap.options import OPTIONS, describe, get_option


def test_defaults_are_described_and_validated() -> None:
    info = describe()
    assert set(info) == set(OPTIONS)
    assert all(v["why"] and v["value"] == v["default"] for v in info.values())
    with pytest.raises(IcemapError, match="unknown icemap option 'thresh'"):
        icemap.set_options(thresh=0.2)
    with pytest.raises(IcemapError, match="ndsi_threshold must be a number in"):
        icemap.set_options(ndsi_threshold=2)
    with pytest.raises(IcemapError, match="chunksize must be an integer in 16..8192"):
        icemap.set_options(chunksize=8)
    with pytest.raises(IcemapError, match="chunksize must be an integer in 16..8192"):
        icemap.set_options(chunksize=100_000_000)  # a Zarr write allocates whole chunks
    assert get_option("ndsi_threshold") == 0.4  # a refused call changed nothing


def test_context_manager_restores_and_functions_follow(sample_region) -> None:
    cube = icemap.load(icemap.search(sample_region.catalog).item_dicts(), bands=["green", "swir16"])
    default = icemap.ice_mask(cube)
    assert default.attrs["threshold"] == 0.4
    with icemap.set_options(ndsi_threshold=0.2, chunksize=64):
        lowered = icemap.ice_mask(cube)
        small = icemap.load(icemap.search(sample_region.catalog).item_dicts(), bands=["green", "swir16"])
        assert lowered.attrs["threshold"] == 0.2
        assert max(small["reflectance"].chunks[-1]) == 64
    assert get_option("ndsi_threshold") == 0.4 and get_option("chunksize") == 1024
    # A lower threshold can only add ice.
    a, b = default.values, lowered.values
    assert ((a == 1) <= (b == 1)).all() and (b == 1).sum() > (a == 1).sum()
    np.testing.assert_array_equal(icemap.ice_mask(cube, threshold=0.2).values, b)
