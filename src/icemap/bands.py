"""Sensor tables: which asset holds which band, and how its numbers become reflectance.

Everything sensor-specific lives here as data, so that the loader, the sample region and the
tests all read the same facts. Adding a sensor means adding a table, not editing code.

The Landsat Collection 2 Level-2 facts come from the USGS Collection 2 Level-2 Science Product
Guide (LSDS-1619) and from the item JSON that Planetary Computer, Earth Search and USGS serve;
the HLS facts from the HLS v2.0 user guide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np

from icemap.errors import BandError
from icemap.kernels import lookup_classes

__all__ = [
    "Band",
    "QABit",
    "Sensor",
    "LANDSAT_C2_L2",
    "HLS",
    "HLS_L30",
    "HLS_S30",
    "SENTINEL2_L2A",
    "SCL_CLASSES",
    "OffsetRule",
    "SENSORS",
    "QA_PIXEL",
    "QA_RADSAT_TERRAIN_OCCLUSION",
    "MASK_FLAGS_DEFAULT",
    "REFLECTIVE_BANDS",
    "get_sensor",
    "qa_mask",
    "radsat_mask",
    "encode_qa_pixel",
    "translate_class_qa",
    "class_qa_to_bits",
]


@dataclass(frozen=True)
class Band:
    """One spectral band of a sensor.

    Parameters
    ----------
    name
        Common name (STAC ``eo:bands`` vocabulary): ``green``, ``swir16``, ...
    number
        The sensor's own band number (OLI band 3 is green).
    asset_keys
        Asset keys this band is published under, in order of preference. Planetary Computer
        and Earth Search use the common name; USGS items of the 0.7/1.0-beta era use file
        names (``SR_B3.TIF``); some catalogs use ``SR_B3`` or ``B03``.
    wavelength_um
        Centre wavelength in micrometres (for plots and documentation).
    scale, offset
        Default decoding ``physical = DN * scale + offset``, used when an asset carries no
        ``raster:bands`` of its own.
    nodata
        The DN that marks fill.
    dtype
        The stored integer type.
    unit
        Physical unit after decoding ("1" for reflectance).
    """

    name: str
    number: int
    asset_keys: tuple[str, ...]
    wavelength_um: float
    scale: float
    offset: float
    nodata: int
    dtype: str = "uint16"
    unit: str = "1"


@dataclass(frozen=True)
class QABit:
    """A flag (one bit) or a confidence field (two bits) of a QA band."""

    name: str
    bit: int
    width: int = 1
    description: str = ""

    def extract(self, qa: np.ndarray) -> np.ndarray:
        """Return the field's value for each pixel of an integer QA array."""
        return (qa >> self.bit) & ((1 << self.width) - 1)


@dataclass(frozen=True)
class OffsetRule:
    """A default offset that depends on an item property (a processing baseline, say).

    ``offset`` applies to items whose ``property`` compares ``>= minimum`` (as strings of equal
    width, e.g. ``"04.00"``, or as numbers); it replaces the band's table offset. An asset's own
    ``raster:bands`` offset always wins over both.
    """

    property: str
    minimum: str
    offset: float

    def applies(self, props: Mapping[str, Any]) -> bool:
        value = props.get(self.property)
        if value is None:
            return False
        try:
            return float(value) >= float(self.minimum)
        except (TypeError, ValueError):
            return str(value) >= self.minimum


@dataclass(frozen=True)
class Sensor:
    """A sensor/product: its bands, QA layout and the collection names it appears under."""

    name: str
    description: str
    bands: tuple[Band, ...]
    collections: tuple[str, ...]
    platforms: tuple[str, ...]
    qa_asset_keys: tuple[str, ...] = ()
    radsat_asset_keys: tuple[str, ...] = ()
    qa_bits: tuple[QABit, ...] = ()
    #: For a QA band of classes (Sentinel-2 SCL): class value -> QA_PIXEL flags it stands for.
    #: The loader translates classes into QA_PIXEL bits, so masking, mosaics and stores work the
    #: same for every sensor. Empty for bit-field QA bands.
    qa_classes: Mapping[int, tuple[str, ...]] = field(default_factory=dict)
    offset_rules: tuple[OffsetRule, ...] = ()
    #: Native pixel size (m) of the bands NDSI uses: the default grid resolution.
    resolution: float = 30.0
    _by_name: Mapping[str, Band] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {b.name: b for b in self.bands})

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.bands)

    def default_offset(self, band: Band, props: Mapping[str, Any]) -> float:
        """The offset of ``band`` for an item whose asset states none: rules first, then the table."""
        for rule in self.offset_rules:
            if rule.applies(props):
                return rule.offset
        return band.offset

    def band(self, name: str) -> Band:
        """Look a band up by common name, with an error that lists the valid names."""
        try:
            return self._by_name[name]
        except KeyError:
            raise BandError(
                f"unknown band {name!r} for {self.name}; choose from {', '.join(self.band_names)}"
            ) from None

    def validate_bands(self, names: Sequence[str]) -> tuple[str, ...]:
        """Check a user's band list (order kept, duplicates refused)."""
        if isinstance(names, str):
            names = [names]
        seen: list[str] = []
        for n in names:
            self.band(n)
            if n in seen:
                raise BandError(f"band {n!r} is listed twice; list each band once")
            seen.append(n)
        if not seen:
            raise BandError("no bands requested; pass at least one band name, e.g. green swir16")
        return tuple(seen)

    def find_asset(self, assets: Mapping[str, Any], band: str) -> str | None:
        """Return the key of the asset that holds ``band`` in an item's assets, or None.

        Asset keys are tried first (in the table's order of preference), then each asset's
        ``eo:bands`` common name, which covers catalogs that invent their own keys.
        """
        spec = self.band(band)
        for key in spec.asset_keys:
            if key in assets:
                return key
        for key, asset in assets.items():
            for eo in asset.get("eo:bands", ()) or ():
                if isinstance(eo, Mapping) and eo.get("common_name") == band:
                    return key
        return None

    def find_qa_asset(self, assets: Mapping[str, Any], radsat: bool = False) -> str | None:
        """Return the key of the QA_PIXEL (or QA_RADSAT) asset in an item, or None."""
        for key in self.radsat_asset_keys if radsat else self.qa_asset_keys:
            if key in assets:
                return key
        return None


def _landsat_band(name: str, number: int, wl: float) -> Band:
    return Band(
        name=name,
        number=number,
        asset_keys=(name, f"SR_B{number}", f"SR_B{number}.TIF", f"B{number}"),
        wavelength_um=wl,
        scale=2.75e-5,
        offset=-0.2,
        nodata=0,
    )


#: QA_PIXEL of Collection 2 (LSDS-1619, table 6-3). Bits 8-15 are two-bit confidences:
#: 0 none, 1 low, 2 medium (cloud only; reserved otherwise), 3 high.
QA_PIXEL: tuple[QABit, ...] = (
    QABit("fill", 0, 1, "outside the scene footprint"),
    QABit("dilated_cloud", 1, 1, "cloud mask grown by a few pixels"),
    QABit("cirrus", 2, 1, "high-confidence cirrus (OLI band 9)"),
    QABit("cloud", 3, 1, "high-confidence cloud"),
    QABit("cloud_shadow", 4, 1, "high-confidence cloud shadow"),
    QABit("snow", 5, 1, "high-confidence snow or ice"),
    QABit("clear", 6, 1, "neither cloud nor dilated cloud"),
    QABit("water", 7, 1, "water"),
    QABit("cloud_confidence", 8, 2),
    QABit("cloud_shadow_confidence", 10, 2),
    QABit("snow_ice_confidence", 12, 2),
    QABit("cirrus_confidence", 14, 2),
)

#: QA_RADSAT bit 11 marks terrain occlusion (OLI); bits 0-10 mark saturation of band n+1.
QA_RADSAT_TERRAIN_OCCLUSION = 11

#: The flags whose pixels are masked (set to NaN) on load. Snow/ice is deliberately absent:
#: it is what icemap maps. Water is kept too: the ice mappers have their own water guard.
MASK_FLAGS_DEFAULT: tuple[str, ...] = ("fill", "dilated_cloud", "cirrus", "cloud", "cloud_shadow")

LANDSAT_C2_L2 = Sensor(
    name="landsat-c2-l2",
    description="Landsat 8/9 OLI/TIRS Collection 2 Level-2 surface reflectance and temperature",
    bands=(
        _landsat_band("coastal", 1, 0.443),
        _landsat_band("blue", 2, 0.482),
        _landsat_band("green", 3, 0.561),
        _landsat_band("red", 4, 0.655),
        _landsat_band("nir08", 5, 0.865),
        _landsat_band("swir16", 6, 1.609),
        _landsat_band("swir22", 7, 2.201),
        Band(
            name="lwir11",
            number=10,
            asset_keys=("lwir11", "ST_B10", "ST_B10.TIF", "B10"),
            wavelength_um=10.9,
            scale=0.00341802,
            offset=149.0,
            nodata=0,
            unit="K",
        ),
    ),
    # "landsat-c2l2-sr" is USGS's own collection id; "landsat-c2-l2" is PC's and Earth Search's.
    collections=("landsat-c2-l2", "landsat-c2l2-sr", "landsat-c2l2-st"),
    platforms=("landsat-8", "landsat-9"),
    qa_asset_keys=("qa_pixel", "QA_PIXEL", "QA_PIXEL.TIF"),
    radsat_asset_keys=("qa_radsat", "QA_RADSAT", "QA_RADSAT.TIF"),
    qa_bits=QA_PIXEL,
)

#: Bands that are surface reflectance (not temperature): NDSI and friends use only these.
REFLECTIVE_BANDS: tuple[str, ...] = tuple(
    b.name for b in LANDSAT_C2_L2.bands if b.unit == "1"
)


def _hls_band(name: str, asset: str, number: int, wl: float) -> Band:
    return Band(
        name=name,
        number=number,
        asset_keys=(name, asset, f"{asset}.tif"),
        wavelength_um=wl,
        scale=1e-4,
        offset=0.0,
        nodata=-9999,
        dtype="int16",
    )


#: HLS v2 L30 (Landsat) reflectance: int16, scale 1e-4, fill -9999. The Fmask band uses a
#: different bit layout from QA_PIXEL, so no QA asset is declared: HLS cubes are masked by fill only.
HLS_L30 = Sensor(
    name="hls",
    description="Harmonized Landsat Sentinel-2 (HLS v2.0) L30 surface reflectance",
    bands=(
        _hls_band("coastal", "B01", 1, 0.443),
        _hls_band("blue", "B02", 2, 0.482),
        _hls_band("green", "B03", 3, 0.561),
        _hls_band("red", "B04", 4, 0.655),
        _hls_band("nir08", "B05", 5, 0.865),
        _hls_band("swir16", "B06", 6, 1.609),
        _hls_band("swir22", "B07", 7, 2.201),
    ),
    collections=("hls", "HLSL30.v2.0", "hls2-l30", "HLSL30_2.0"),
    platforms=("landsat-8", "landsat-9"),
)
HLS = HLS_L30

#: HLS v2 S30 (Sentinel-2 MSI, harmonised to Landsat): same encoding as L30, but Sentinel-2 band
#: numbers: the narrow NIR that matches OLI band 5 is B8A, SWIR1 is B11 and SWIR2 is B12.
HLS_S30 = Sensor(
    name="hls-s30",
    description="Harmonized Landsat Sentinel-2 (HLS v2.0) S30 surface reflectance",
    bands=(
        _hls_band("coastal", "B01", 1, 0.443),
        _hls_band("blue", "B02", 2, 0.492),
        _hls_band("green", "B03", 3, 0.560),
        _hls_band("red", "B04", 4, 0.665),
        _hls_band("nir08", "B8A", 9, 0.865),
        _hls_band("swir16", "B11", 11, 1.614),
        _hls_band("swir22", "B12", 12, 2.202),
    ),
    collections=("HLSS30.v2.0", "hls2-s30", "HLSS30_2.0"),
    platforms=("sentinel-2a", "sentinel-2b", "sentinel-2c"),
)


def _s2_band(name: str, es_key: str, pc_key: str, number: int, wl: float) -> Band:
    # Earth Search v1 keys by common name (plus "-jp2" copies); Planetary Computer by band code.
    return Band(name=name, number=number, asset_keys=(es_key, pc_key, f"{pc_key}.tif", f"{pc_key}.jp2"),
                wavelength_um=wl, scale=1e-4, offset=0.0, nodata=0)


#: Sentinel-2 scene classification (SCL) -> the QA_PIXEL flags each class stands for. Masked by
#: default: no data (0) and saturated/defective (1) as fill, cloud shadow (3), cloud medium and
#: high probability (8, 9), thin cirrus (10). Snow (11) and water (6) only set their flags, which
#: are never masked. Dark area (2), vegetation (4), bare soil (5) and unclassified (7) are clear.
SCL_CLASSES: dict[int, tuple[str, ...]] = {
    0: ("fill",), 1: ("fill",), 3: ("cloud_shadow",), 6: ("water",), 8: ("cloud",), 9: ("cloud",),
    10: ("cirrus",), 11: ("snow",),
}

#: Sentinel-2 L2A (Earth Search ``sentinel-2-l2a``, Planetary Computer ``sentinel-2-l2a``):
#: uint16 DN, scale 1e-4, nodata 0. From processing baseline 04.00 (25 Jan 2022) the DNs carry a
#: +1000 offset (BOA_ADD_OFFSET), i.e. reflectance = DN * 1e-4 - 0.1: taken from the asset's
#: raster:bands when stated (Earth Search), else from ``s2:processing_baseline``. Blue, green,
#: red and nir are 10 m; nir08, swir16, swir22 and SCL are 20 m, so the default grid is 20 m
#: (10 m bands are resampled by nearest neighbour; pass resolution=10 to keep them).
SENTINEL2_L2A = Sensor(
    name="sentinel-2-l2a",
    description="Sentinel-2 MSI Level-2A surface reflectance (Sen2Cor)",
    bands=(
        _s2_band("blue", "blue", "B02", 2, 0.490),
        _s2_band("green", "green", "B03", 3, 0.560),
        _s2_band("red", "red", "B04", 4, 0.665),
        _s2_band("nir", "nir", "B08", 8, 0.842),
        _s2_band("nir08", "nir08", "B8A", 9, 0.865),
        _s2_band("swir16", "swir16", "B11", 11, 1.610),
        _s2_band("swir22", "swir22", "B12", 12, 2.190),
    ),
    collections=("sentinel-2-l2a", "sentinel-2-c1-l2a", "sentinel-s2-l2a-cogs"),
    platforms=("sentinel-2a", "sentinel-2b", "sentinel-2c"),
    qa_asset_keys=("scl", "SCL", "SCL.tif", "SCL.jp2"),
    qa_bits=QA_PIXEL,
    qa_classes=SCL_CLASSES,
    offset_rules=(OffsetRule("s2:processing_baseline", "04.00", -0.1),),
    resolution=20.0,
)

SENSORS: dict[str, Sensor] = {s.name: s for s in (LANDSAT_C2_L2, HLS_L30, HLS_S30, SENTINEL2_L2A)}


def get_sensor(name_or_collection: str | Sensor) -> Sensor:
    """Return the sensor table for a sensor name or a STAC collection id."""
    if isinstance(name_or_collection, Sensor):
        return name_or_collection
    key = name_or_collection
    if key in SENSORS:
        return SENSORS[key]
    for sensor in SENSORS.values():
        if key in sensor.collections:
            return sensor
    raise BandError(
        f"no sensor table for {key!r}; known sensors: {', '.join(SENSORS)} "
        f"(collections: {', '.join(c for s in SENSORS.values() for c in s.collections)}). "
        "Pass sensor='landsat-c2-l2', 'hls' or 'sentinel-2-l2a' explicitly."
    )


def _qa_field(name: str) -> QABit:
    for b in QA_PIXEL:
        if b.name == name:
            return b
    raise BandError(
        f"unknown QA_PIXEL flag {name!r}; choose from {', '.join(b.name for b in QA_PIXEL)}"
    )


def qa_flag_bits(flags: Sequence[str] = MASK_FLAGS_DEFAULT) -> int:
    """The QA_PIXEL bits of the named flags, OR-ed into one integer (validates the names)."""
    mask_bits = 0
    for name in flags:
        f = _qa_field(name)
        if f.width != 1:
            raise BandError(f"{name!r} is a confidence field, not a flag; pass flags only")
        mask_bits |= 1 << f.bit
    return mask_bits


def qa_mask(qa: np.ndarray, flags: Sequence[str] = MASK_FLAGS_DEFAULT) -> np.ndarray:
    """True where any of ``flags`` is set in a QA_PIXEL array.

    Works on numpy and dask arrays alike (only bitwise operators are used).
    """
    return (qa & np.uint16(qa_flag_bits(flags))) != 0


def radsat_mask(radsat: np.ndarray, bands: Sequence[int] | None = None) -> np.ndarray:
    """True where QA_RADSAT marks saturation in any of the given OLI band numbers (1-11).

    Terrain occlusion (bit 11) is not saturation and is left alone; by default every band
    1-7 counts, since a saturated band anywhere corrupts the indices built from it.
    """
    numbers = range(1, 8) if bands is None else bands
    bits = 0
    for n in numbers:
        if not 1 <= n <= 11:
            raise BandError(f"QA_RADSAT has bands 1-11, not {n}")
        bits |= 1 << (n - 1)
    return (radsat & np.uint16(bits)) != 0


def encode_qa_pixel(
    *,
    fill: np.ndarray | bool = False,
    cloud: np.ndarray | bool = False,
    dilated_cloud: np.ndarray | bool = False,
    cirrus: np.ndarray | bool = False,
    cloud_shadow: np.ndarray | bool = False,
    snow: np.ndarray | bool = False,
    water: np.ndarray | bool = False,
) -> np.ndarray:
    """Encode boolean class layers as Collection 2 QA_PIXEL values.

    The confidences follow what USGS writes for such pixels: high cloud confidence where
    cloud, high shadow/snow confidence where those flags are set and low otherwise, and
    ``clear`` where neither cloud nor dilated cloud. Fill pixels get exactly 1, as USGS does.
    Used by the sample region and by tests to produce realistic QA bands.
    """
    layers = np.broadcast_arrays(
        *(np.asarray(a, dtype=bool) for a in (fill, cloud, dilated_cloud, cirrus, cloud_shadow, snow, water))
    )
    fill_, cloud_, dil_, cirrus_, shadow_, snow_, water_ = layers
    qa = np.zeros(fill_.shape, dtype=np.uint16)
    qa |= dil_.astype(np.uint16) << 1
    qa |= cirrus_.astype(np.uint16) << 2
    qa |= cloud_.astype(np.uint16) << 3
    qa |= shadow_.astype(np.uint16) << 4
    qa |= snow_.astype(np.uint16) << 5
    qa |= (~(cloud_ | dil_)).astype(np.uint16) << 6
    qa |= water_.astype(np.uint16) << 7
    qa |= np.where(cloud_, 3, 1).astype(np.uint16) << 8
    qa |= np.where(shadow_, 3, 1).astype(np.uint16) << 10
    qa |= np.where(snow_, 3, 1).astype(np.uint16) << 12
    qa |= np.where(cirrus_, 3, 1).astype(np.uint16) << 14
    return np.where(fill_, np.uint16(1), qa).astype(np.uint16)


def _class_lut(classes: Mapping[int, tuple[str, ...]]) -> np.ndarray:
    """QA_PIXEL value for each class value 0-255 (float32, so NaN can pass through)."""
    lut = np.empty(256, np.float32)
    for value in range(256):
        flags = classes.get(value, ())
        lut[value] = encode_qa_pixel(**{f: True for f in flags})
    return lut


def class_qa_to_bits(qa: Any, sensor: Sensor) -> Any:
    """A class-valued QA layer (SCL) as a dask array as the equivalent QA_PIXEL bits (float32).

    NaN (nothing read) stays NaN and becomes fill later. Sensors with a bit-field QA band get
    ``qa`` back unchanged.
    """
    if not sensor.qa_classes:
        return qa

    return da.map_blocks(lookup_classes, qa, _class_lut(sensor.qa_classes), dtype=np.float32)


def translate_class_qa(stack: Any, sensor: Sensor, position: int) -> Any:
    """Replace a class-valued QA layer (SCL) in a stacked cube by the equivalent QA_PIXEL bits.

    ``stack`` is stackstac's (time, asset, y, x) float32 array with the QA asset at
    ``position``; NaN (outside the footprint) stays NaN and becomes fill later. Sensors with a
    bit-field QA band are returned unchanged.
    """
    if not sensor.qa_classes:
        return stack

    data = stack.data
    qa = class_qa_to_bits(data[:, position], sensor)
    merged = da.concatenate([data[:, :position], qa[:, None], data[:, position + 1:]], axis=1)
    return stack.copy(data=merged)
