"""The kernel layer: every per-pixel operation of icemap, on plain numpy arrays.

flox's layering, bottom floor: numpy arrays in, numpy arrays out, no dask, xarray or torch. The
dask and xarray layers above (:mod:`icemap.load`, :mod:`icemap.index`, :mod:`icemap.metrics`,
:mod:`icemap.vector`, :mod:`icemap.infer`) only decide *which* blocks meet; the arithmetic on a
block is written here, once.

Why numba. numpy evaluates ``(g - s) / (g + s)`` with clipping and NaN rules as five or six
full passes, each allocating a block-sized temporary; on this hardware those temporaries, not
the arithmetic or the memory bandwidth, are the cost (docs/benchmarks.md measured numpy's bare
formula at a fraction of a single fused pass). A compiled loop reads each input once and writes
each output once. numba is the well-kept way to get such a loop from Python without a C
extension to build; the kernels are compiled ``nogil`` (dask's threads run them concurrently)
and ``cache=True`` (each worker process compiles once per machine, not once per process), with
numpy's error model (0/0 is NaN, as in numpy) and without fastmath (no reassociation, no FMA
contraction), so every kernel equals its plain-numpy reference in ``tests/test_kernels.py``
bit for bit.

Conventions shared by all kernels:

* **Shapes.** Inputs are ``(..., y, x)``, seen as planes ``(planes, y, x)``; an input whose
  shape is the output's trailing shape (a DEM ``(y, x)`` beside bands ``(time, y, x)``) is read
  for every plane without being broadcast in memory.
* **Contiguity.** numba vectorises the loops over C-contiguous blocks (what Zarr and COG reads
  hand over); blocks sliced out of an in-memory array are read and written in place through a
  strided variant, which is slower per pixel but cheaper than copying them (see
  :func:`_planes`).
* **Outputs.** Every kernel accepts ``out=`` and writes into it, also when it is a slice of a
  larger array: a caller that owns the destination (a preallocated array) pays no allocation.
* **NaN** is nodata for reflectance and indices; :data:`ICE_NODATA` for ice masks;
  :data:`QA_FILL` for QA_PIXEL. These constants live here; defaults a user may change (the
  NDSI threshold, chunk and tile sizes) live in :mod:`icemap.options`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

import numpy as np
import numpy.typing as npt

try:  # numba is a core dependency; the import is here, not at `import icemap`.
    from numba import njit
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError("icemap's kernels need numba: pip install numba (it is a dependency of icemap)") from exc

__all__ = [
    "ICE_NODATA",
    "QA_FILL",
    "NO_GLACIER",
    "normalized_difference",
    "ice_mask",
    "probability_mask",
    "scale_mask",
    "qa_to_uint16",
    "qa_from_reflectance",
    "filled_flag",
    "slope_degrees",
    "stretch_uint8",
    "mosaic_first_valid",
    "lookup_classes",
    "normalise_channels",
    "confusion_counts",
    "count_by_id",
    "glacier_stats",
    "GLACIER_STATS",
    "threshold_histogram",
    "COMPOSITE_RULES",
    "composite",
]

#: Ice masks: 0 no ice, 1 ice, 255 nodata (cloud, fill, undecided guard). Stored as the
#: Zarr/COG fill value of every uint8 product.
ICE_NODATA = np.uint8(255)
#: QA_PIXEL value of fill pixels (bit 0 alone): the store's fill value for ``qa_pixel``.
QA_FILL = np.uint16(1)
#: Glacier-id raster value outside every outline.
NO_GLACIER = 0

_JIT: dict[str, Any] = dict(nogil=True, cache=True, error_model="numpy")
# Scalars handed to the compiled kernels: numba compiles one specialisation per argument type, so
# callers pass numpy scalars (np.float32 keeps the arithmetic in float32) as well as Python numbers.
_Float = float | np.floating[Any]
_Int = int | np.integer[Any]
_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _compiled(**options: Any) -> Callable[[_Fn], _Fn]:
    """``numba.njit(**options)`` as a typed decorator: numba's is untyped, and the compiled
    dispatcher is called exactly like the Python function it wraps."""
    return cast(Callable[[_Fn], _Fn], njit(**options))

# A 1x1 stand-in for optional inputs that are switched off: numba compiles one specialisation
# per type signature, so optional arrays are always arrays, and their flag decides if they are read.
_NO_F32 = np.zeros((1, 1, 1), np.float32)


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


def _yx(shape: tuple[int, ...]) -> tuple[int, int]:
    if len(shape) >= 2:
        return int(shape[-2]), int(shape[-1])
    return 1, (int(shape[0]) if shape else 1)


def _planes(a: npt.ArrayLike, shape: tuple[int, ...], dtype: npt.DTypeLike | None = None) -> np.ndarray:
    """An input as ``(planes, y, x)`` for an output of ``shape``, a view whenever strides allow.

    Its planes are the output's, or one (a DEM ``(y, x)`` beside bands ``(time, y, x)``), which
    the kernels then read for every output plane: nothing is broadcast in memory. A strided
    input (a block sliced out of an in-memory cube) stays a view: numba compiles a strided
    variant of the loop, which does not vectorise but still beats copying the block first
    (measured on 1024 x 1024 blocks of a 4096-px cube: 2.1 ms strided, 7.2 ms copy + loop + copy
    back, 0.8 ms for contiguous blocks, which is what Zarr and COG reads hand over).
    """
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    yx = _yx(shape)
    if not (a.shape == tuple(shape) or (a.ndim >= 2 and tuple(a.shape[-2:]) == yx and a.size == yx[0] * yx[1])):
        a = np.ascontiguousarray(np.broadcast_to(a, shape))
    try:
        return a.reshape(-1, *yx, copy=False)
    except ValueError:  # leading axes that cannot merge: copy
        return np.ascontiguousarray(a).reshape(-1, *yx)


def _out(out: np.ndarray | None, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != tuple(shape) or out.dtype != np.dtype(dtype):
        raise ValueError(f"out must be a {np.dtype(dtype)} array of shape {shape}, got {out.dtype} {out.shape}")
    return out


class _Target:
    """The output of a kernel as a writable ``(planes, y, x)`` view of ``out``.

    A slice of a larger destination is written in place; only an ``out`` whose leading axes
    cannot be merged into one goes through a scratch buffer that :meth:`done` copies back.
    """

    def __init__(self, out: np.ndarray) -> None:
        self.out = out
        try:
            self.array = out.reshape(-1, *_yx(out.shape), copy=False)
            self._copy = False
        except ValueError:
            self.array = np.empty((int(np.prod(out.shape[:-2])), *_yx(out.shape)), out.dtype)
            self._copy = True

    def done(self) -> np.ndarray:
        if self._copy:
            np.copyto(self.out, self.array.reshape(self.out.shape))
        return self.out


def _rowed(a: np.ndarray) -> tuple[np.ndarray, int, int]:
    """A ``(planes, y, x)`` view as ``(flat, plane_step, row_step)`` for the row kernels.

    ``flat`` is a 1-D, C-contiguous view from the first element to the last; row ``r`` of plane
    ``p`` is ``flat[p * plane_step + r * row_step:][:x]``. numba vectorises loops over such rows
    (1-D contiguous slices) but not over a strided 3-D array: on 1024 x 1024 blocks sliced out
    of a 4096-px cube, 1.1 ms against 2.1 ms (0.8 ms for a contiguous block). A single plane or
    row gets step 0, which is how one (y, x) input serves every plane.
    """
    it = a.itemsize
    if a.strides[-1] != it or any(st < 0 or st % it for st in a.strides):
        a = np.ascontiguousarray(a)
    planes, h, w = a.shape
    ps = a.strides[0] // it if planes > 1 else 0
    rs = a.strides[1] // it if h > 1 else 0
    span = (planes - 1) * ps + (h - 1) * rs + w
    return np.lib.stride_tricks.as_strided(a, shape=(span,), strides=(it,)), ps, rs


@_compiled(inline="always")
def _row(a: np.ndarray, ps: int, rs: int, p: int, r: int, w: int) -> np.ndarray:  # pragma: no cover - compiled
    start = p * ps + r * rs
    return a[start:start + w]


# ----------------------------------------------------------------------------------------------
# Normalised differences and the NDSI ice mask
# ----------------------------------------------------------------------------------------------


@_compiled(**_JIT)
def _nd_rows(a: np.ndarray, aps: int, ars: int, b: np.ndarray, bps: int, brs: int, out: np.ndarray, ops: int,
             ors: int, planes: int, h: int, w: int, undefined: _Float, fill: bool) -> None:  # pragma: no cover
    zero = np.float32(0)
    for p in range(planes):
        for r in range(h):
            ra = _row(a, aps, ars, p, r, w)
            rb = _row(b, bps, brs, p, r, w)
            ro = _row(out, ops, ors, p, r, w)
            if fill:  # loop-invariant: the plain loop below stays as it was (and vectorises)
                for i in range(w):
                    x = ra[i]
                    y = rb[i]
                    if x < zero:
                        x = zero
                    if y < zero:
                        y = zero
                    s = x + y
                    ro[i] = undefined if s == zero else (x - y) / s  # NaN inputs: s is NaN
                continue
            for i in range(w):
                x = ra[i]
                y = rb[i]
                if x < zero:  # NaN compares False and stays NaN, as np.maximum propagates it
                    x = zero
                if y < zero:
                    y = zero
                ro[i] = (x - y) / (x + y)  # 0/0 -> NaN (numpy error model)


def normalized_difference(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None,
                          undefined: float = np.nan) -> np.ndarray:
    """``(a - b) / (a + b)`` in float32, robust to the quirks of surface reflectance.

    Negative reflectances (atmospheric over-correction in dark pixels) are clipped to 0 before
    the ratio, so the result stays within [-1, 1]; where both are 0 the ratio is undefined and
    ``undefined`` (NaN by default, as for NaN inputs, which stay NaN whatever ``undefined``
    is). The U-Net's index channels pass ``undefined=0``: a deep-shadow pixel with every band
    measured is a pixel to map, and 0 is the ratio's limit along ``a == b``, which two
    clipped zeros are. One pass, no temporaries; ``out`` may be a slice of a larger array.
    """
    shape = np.broadcast_shapes(np.shape(a), np.shape(b))
    res = _out(out, shape, np.float32)
    if not res.size:
        return res
    target = _Target(res)
    planes, h, w = target.array.shape
    fill = not np.isnan(undefined)
    _nd_rows(*_rowed(_planes(a, shape, np.float32)), *_rowed(_planes(b, shape, np.float32)),
             *_rowed(target.array), planes, h, w, np.float32(0 if not fill else undefined), fill)
    return target.done()


@_compiled(**_JIT)
def _ice_planes(g: np.ndarray, s: np.ndarray, nir: np.ndarray, elev: np.ndarray, slope: np.ndarray,
                threshold: _Float, nir_min: _Float, ndwi_max: _Float, green_min: _Float, elev_min: _Float,
                slope_max: _Float, out: np.ndarray, ndsi_out: np.ndarray, write_ndsi: bool) -> None:  # pragma: no cover - compiled
    planes, h, w = out.shape
    zero = np.float32(0)
    water = not (np.isnan(nir_min) and np.isnan(ndwi_max))
    for p in range(planes):
        pg = p % g.shape[0]
        ps = p % s.shape[0]
        pn = p % nir.shape[0]
        pe = p % elev.shape[0]
        pl = p % slope.shape[0]
        for r in range(h):
            for i in range(w):
                green = g[pg, r, i]
                x = green
                y = s[ps, r, i]
                if x < zero:
                    x = zero
                if y < zero:
                    y = zero
                idx = (x - y) / (x + y)
                if write_ndsi:
                    ndsi_out[p, r, i] = idx
                if np.isnan(idx):
                    out[p, r, i] = ICE_NODATA
                    continue
                if not idx >= threshold:
                    out[p, r, i] = 0
                    continue
                # An NDSI ice candidate: a guard that rejects it wins; a guard that cannot test it
                # (its input is NaN) makes it nodata; otherwise it is ice.
                rejected = False
                unknown = False
                if water:
                    v = nir[pn, r, i]
                    if np.isnan(v):
                        unknown = True
                    if v < nir_min:
                        rejected = True
                    if not np.isnan(ndwi_max):
                        gw = green if not green < zero else zero  # clip as _nd_planes: NaN stays NaN
                        vw = v if not v < zero else zero
                        if (gw - vw) / (gw + vw) > ndwi_max:
                            rejected = True
                if green < green_min:
                    rejected = True
                if not np.isnan(elev_min):
                    e = elev[pe, r, i]
                    if np.isnan(e):
                        unknown = True
                    elif e < elev_min:
                        rejected = True
                if not np.isnan(slope_max):
                    sl = slope[pl, r, i]
                    if np.isnan(sl):
                        unknown = True
                    elif sl > slope_max:
                        rejected = True
                if rejected:
                    out[p, r, i] = 0
                elif unknown:
                    out[p, r, i] = ICE_NODATA
                else:
                    out[p, r, i] = 1


def ice_mask(
    green: np.ndarray,
    swir16: np.ndarray,
    threshold: float,
    *,
    nir08: np.ndarray | None = None,
    elevation: np.ndarray | None = None,
    slope: np.ndarray | None = None,
    nir_min: float | None = None,
    ndwi_max: float | None = None,
    green_min: float | None = None,
    elevation_min_m: float | None = None,
    slope_max_deg: float | None = None,
    out: np.ndarray | None = None,
    ndsi_out: np.ndarray | None = None,
) -> np.ndarray:
    """NDSI threshold and guards in one pass: uint8 1 ice, 0 not, :data:`ICE_NODATA`.

    A pixel is ice where ``NDSI >= threshold`` (compared in float32, NDSI as
    :func:`normalized_difference`) and no guard rejects it. Guards (``None`` = off):
    water rejects ``nir08 < nir_min`` or ``NDWI(green, nir08) > ndwi_max``; dark rejects
    ``green < green_min``; terrain rejects ``elevation < elevation_min_m`` or
    ``slope > slope_max_deg``. Nodata where NDSI is undefined, and where NDSI says ice, no guard
    rejects and an active guard's input is NaN (a guard that cannot test a pixel must not pass
    it). ``ndsi_out``, when given, receives the NDSI of every pixel from the same pass, so a job
    writing both products computes the index once.
    """
    shape = np.broadcast_shapes(np.shape(green), np.shape(swir16))
    res = _out(out, shape, np.uint8)
    if not res.size:
        return res
    target = _Target(res)
    nd_target = _Target(_out(ndsi_out, shape, np.float32)) if ndsi_out is not None else None

    def opt(a: np.ndarray | None, on: bool, what: str) -> np.ndarray:
        if not on:
            return _NO_F32
        if a is None:
            raise ValueError(f"{what} is needed by an active guard")
        return _planes(a, shape, np.float32)

    def num(v: float | None) -> np.float32:
        return np.float32(np.nan) if v is None else np.float32(v)

    _ice_planes(
        _planes(green, shape, np.float32), _planes(swir16, shape, np.float32),
        opt(nir08, nir_min is not None or ndwi_max is not None, "nir08"),
        opt(elevation, elevation_min_m is not None, "elevation"), opt(slope, slope_max_deg is not None, "slope"),
        np.float32(threshold), num(nir_min), num(ndwi_max), num(green_min), num(elevation_min_m),
        num(slope_max_deg), target.array, nd_target.array if nd_target else _NO_F32, nd_target is not None,
    )
    if nd_target is not None:
        nd_target.done()
    return target.done()


@_compiled(**_JIT)
def _prob_planes(prob: np.ndarray, threshold: _Float, out: np.ndarray) -> None:  # pragma: no cover - compiled
    planes, h, w = out.shape
    for p in range(planes):
        for r in range(h):
            for i in range(w):
                v = prob[p, r, i]
                if np.isnan(v):
                    out[p, r, i] = ICE_NODATA
                elif v >= threshold:
                    out[p, r, i] = 1
                else:
                    out[p, r, i] = 0


def probability_mask(prob: np.ndarray, threshold: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """Ice probability -> uint8 mask: 1 where ``prob >= threshold``, 0 below, 255 where NaN."""
    shape = np.shape(prob)
    res = _out(out, shape, np.uint8)
    if not res.size:
        return res
    target = _Target(res)
    _prob_planes(_planes(prob, shape, np.float32), np.float32(threshold), target.array)
    return target.done()


# ----------------------------------------------------------------------------------------------
# Loading: DN -> reflectance with QA_PIXEL / QA_RADSAT masks
# ----------------------------------------------------------------------------------------------


@_compiled(**_JIT)
def _scale_mask_planes(dn: np.ndarray, qa: np.ndarray, radsat: np.ndarray, scale: np.ndarray, offset: np.ndarray,
                       nodata: np.ndarray, qa_bits: _Int, sat_bits: _Int, has_qa: bool, has_radsat: bool,
                       has_nodata: bool, out: np.ndarray) -> None:  # pragma: no cover - compiled
    # Compiled once per input dtype: float32 DNs (NaN = not read) and native integer DNs
    # (``nodata`` = not read). ``x != x`` is NaN for floats and never true for integers.
    planes, h, w = out.shape
    nan = np.float32(np.nan)
    for p in range(planes):
        pq = p % qa.shape[0]
        pr = p % radsat.shape[0]
        sc = scale[p % scale.shape[0]]
        of = offset[p % offset.shape[0]]
        nd = nodata[p % nodata.shape[0]]
        for r in range(h):
            for i in range(w):
                v = np.float32(dn[p, r, i])
                if v != v or (has_nodata and v == nd):
                    out[p, r, i] = nan
                    continue
                if has_qa:
                    q = qa[pq, r, i]
                    bits = np.uint16(1) if q != q else np.uint16(q)  # unread QA is fill
                    if bits & qa_bits:
                        out[p, r, i] = nan
                        continue
                if has_radsat:
                    q = radsat[pr, r, i]
                    if q == q and (np.uint16(q) & sat_bits):
                        out[p, r, i] = nan
                        continue
                out[p, r, i] = v * sc + of


def scale_mask(
    dn: np.ndarray,
    scale: np.ndarray | float,
    offset: np.ndarray | float,
    *,
    qa: np.ndarray | None = None,
    qa_bits: int = 0,
    radsat: np.ndarray | None = None,
    sat_bits: int = 0,
    nodata: np.ndarray | float | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Digital numbers -> reflectance ``dn * scale + offset``, masked.

    ``dn`` is float32 with NaN where nothing was read (stackstac's float stack), or the DNs in
    their native integer type (odc-stac reads them so: half the bytes through every task), with
    ``nodata`` the value that means "not read" (a scalar or one value per item). NaN where ``dn``
    is NaN or ``nodata``, where ``qa`` (QA_PIXEL as read, integer or float32; NaN counts as fill)
    has any of ``qa_bits``, or where ``radsat`` (QA_RADSAT) has any of ``sat_bits`` (the bit of
    this band). ``scale``/``offset`` are scalars or one value per item along the first axis of
    ``dn`` (``(items, y, x)``). Float32 throughout, so a stored cube equals
    ``DN * scale + offset`` computed in float32 whatever the DNs' type.
    """
    shape = np.shape(dn)
    res = _out(out, shape, np.float32)
    if not res.size:
        return res
    sc = np.ascontiguousarray(np.asarray(scale, np.float32).reshape(-1))
    of = np.ascontiguousarray(np.asarray(offset, np.float32).reshape(-1))
    nd = np.ascontiguousarray(np.asarray(np.nan if nodata is None else nodata, np.float32).reshape(-1))
    planes = _planes(dn, shape, None if _native(dn) else np.float32)
    if sc.size not in (1, planes.shape[0]) or of.size != sc.size or nd.size not in (1, planes.shape[0]):
        raise ValueError(f"scale/offset/nodata need 1 or {planes.shape[0]} values (one per item), "
                         f"got {sc.size}/{of.size}/{nd.size}")
    target = _Target(res)
    _scale_mask_planes(
        planes,
        _NO_F32 if qa is None else _planes(qa, shape, None if _native(qa) else np.float32),
        _NO_F32 if radsat is None else _planes(radsat, shape, None if _native(radsat) else np.float32),
        sc, of, nd, np.uint16(qa_bits), np.uint16(sat_bits), qa is not None, radsat is not None,
        nodata is not None, target.array,
    )
    return target.done()


def _native(a: Any) -> bool:
    """Whether a kernel reads ``a`` as it is: unsigned/signed integers up to 16 bits, or float32."""
    dt = np.asarray(a).dtype
    return dt in (np.uint8, np.uint16, np.int16, np.float32)


@_compiled(**_JIT)
def _qa_planes(qa: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    planes, h, w = out.shape
    for p in range(planes):
        for r in range(h):
            for i in range(w):
                q = qa[p, r, i]
                out[p, r, i] = np.uint16(1) if np.isnan(q) else np.uint16(q)


def qa_to_uint16(qa: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """QA_PIXEL read as float32 (NaN where nothing was read) -> uint16, NaN -> :data:`QA_FILL`."""
    shape = np.shape(qa)
    res = _out(out, shape, np.uint16)
    if not res.size:
        return res
    target = _Target(res)
    _qa_planes(_planes(qa, shape, np.float32), target.array)
    return target.done()


@_compiled(**_JIT)
def _fill_qa_planes(refl: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    planes, bands, h, w = refl.shape
    for p in range(planes):
        for r in range(h):
            for i in range(w):
                fill = True
                for b in range(bands):
                    if not np.isnan(refl[p, b, r, i]):
                        fill = False
                        break
                out[p, r, i] = np.uint16(1) if fill else np.uint16(0)


def qa_from_reflectance(refl: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """QA_PIXEL for scenes loaded without one: :data:`QA_FILL` where every band is NaN, else 0.

    ``refl`` is ``(..., band, y, x)``; the result ``(..., y, x)`` uint16. Without a QA band
    nothing is known about clouds (0 = "clear"), but fill is still fill: a pixel no band
    covers must not read as a clear observation. One pass, stopping at the first valid band.
    """
    refl = np.asarray(refl, dtype=np.float32)
    if refl.ndim < 3:
        raise ValueError(f"reflectance must be (..., band, y, x), got shape {refl.shape}")
    shape = refl.shape[:-3] + refl.shape[-2:]
    res = _out(out, shape, np.uint16)
    if not res.size:
        return res
    target = _Target(res)
    _fill_qa_planes(np.ascontiguousarray(refl).reshape(-1, *refl.shape[-3:]), target.array)
    return target.done()


@_compiled(**_JIT)
def _slope_plane(z: np.ndarray, dy: float, dx: float, out: np.ndarray) -> None:  # pragma: no cover - compiled
    h, w = z.shape
    for r in range(h):
        r0, r1 = (r - 1, r + 1) if 0 < r < h - 1 else ((0, 1) if r == 0 else (h - 2, h - 1))
        sy = 2.0 * dy if 0 < r < h - 1 else dy
        for i in range(w):
            i0, i1 = (i - 1, i + 1) if 0 < i < w - 1 else ((0, 1) if i == 0 else (w - 2, w - 1))
            sx = 2.0 * dx if 0 < i < w - 1 else dx
            gy = (np.float64(z[r1, i]) - np.float64(z[r0, i])) / sy
            gx = (np.float64(z[r, i1]) - np.float64(z[r, i0])) / sx
            out[r, i] = np.float32(np.degrees(np.arctan(np.hypot(gx, gy))))


def slope_degrees(z: np.ndarray, dy: float, dx: float, *, out: np.ndarray | None = None) -> np.ndarray:
    """Terrain slope in degrees of a ``(y, x)`` elevation grid with pixel sizes ``dy``, ``dx``.

    numpy's ``np.gradient`` rule (central differences inside, one-sided at the edges, in
    float64), then ``degrees(arctan(hypot(gx, gy)))`` as float32, in one pass instead of six
    grid-sized temporaries. NaN elevations give NaN slopes around them.
    """
    z = np.asarray(z)
    if z.ndim != 2 or z.shape[0] < 2 or z.shape[1] < 2:
        raise ValueError(f"slope needs a (y, x) grid of at least 2 x 2 pixels, got shape {z.shape}")
    res = _out(out, z.shape, np.float32)
    _slope_plane(z, float(dy), float(dx), res)
    return res


def stretch_uint8(band: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear stretch of ``[lo, hi]`` to 0-255 (NaN -> 0, clipped): a picture, not data, made
    once per quicklook on an averaged-down frame, so plain numpy."""
    scaled = (np.asarray(band, np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-6))
    stretched: np.ndarray = (np.clip(np.nan_to_num(scaled, nan=0.0), 0, 1) * 255).astype(np.uint8)
    return stretched


@_compiled(**_JIT)
def _filled_planes(before: np.ndarray, after: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    planes, bands, h, w = before.shape
    for p in range(planes):
        for r in range(h):
            for i in range(w):
                hit = np.uint8(0)
                for b in range(bands):
                    if np.isnan(before[p, b, r, i]) and not np.isnan(after[p, b, r, i]):
                        hit = np.uint8(1)
                        break
                out[p, r, i] = hit


def filled_flag(before: np.ndarray, after: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """1 where gap filling gave any band of a pixel a value it did not have, else 0 (uint8).

    ``before`` and ``after`` are ``(..., band, y, x)`` reflectance; the flag is ``(..., y, x)``.
    """
    before = np.asarray(before, dtype=np.float32)
    after = np.asarray(after, dtype=np.float32)
    if before.shape != after.shape or before.ndim < 3:
        raise ValueError(f"before and after must be (..., band, y, x) of one shape, got {before.shape}, {after.shape}")
    shape = before.shape[:-3] + before.shape[-2:]
    res = _out(out, shape, np.uint8)
    if not res.size:
        return res
    target = _Target(res)
    _filled_planes(np.ascontiguousarray(before).reshape(-1, *before.shape[-3:]),
                   np.ascontiguousarray(after).reshape(-1, *after.shape[-3:]), target.array)
    return target.done()


def normalise_channels(x: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                       channel_axis: int = -3) -> tuple[np.ndarray, np.ndarray]:
    """Min-max normalise the U-Net's input channels and fill NaN with 0: ``(filled, nodata)``.

    ``nodata`` is True where any channel was NaN; the predictor restores those pixels as nodata.
    The fill is per pixel, so a pixel's value never depends on where a tile starts. Runs once
    per inference window, next to a network that costs thousands of times more: plain numpy.
    """
    shape = [1] * x.ndim
    shape[channel_axis] = -1
    lo_, hi_ = np.asarray(lo, np.float32).reshape(shape), np.asarray(hi, np.float32).reshape(shape)
    z = (x.astype(np.float32, copy=False) - lo_) / (hi_ - lo_)
    nodata = np.asarray(np.isnan(z).any(axis=channel_axis))
    return np.nan_to_num(z, nan=0.0).astype(np.float32, copy=False), nodata


def lookup_classes(block: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Class rasters (float32 as read, e.g. Sentinel-2 SCL) -> ``lut[class]``; NaN, negative or
    out-of-table values -> NaN. One gather per pixel; runs on the QA band only, so numpy."""
    out = np.full(block.shape, np.nan, np.float32)
    ok = np.isfinite(block) & (block >= 0) & (block < lut.size)
    out[ok] = lut[block[ok].astype(np.intp)]
    return out


def mosaic_first_valid(block: np.ndarray, n_bands: int) -> np.ndarray:
    """First-valid mosaic of ``(scenes, n_bands + 1, y, x)``: reflectance bands then QA last.

    A pixel is taken from the first scene with any valid reflectance there; where none has, from
    the first scene that is not fill (so cloud flags survive), else fill. Runs only for days
    with several scenes of one path (a handful of blocks per region), so plain numpy.
    """
    refl, qa = block[:, :n_bands], block[:, n_bands]
    valid = ~np.isnan(refl).all(axis=1)
    not_fill = qa != QA_FILL
    has_valid = valid.any(axis=0)
    idx = np.where(has_valid, valid.argmax(axis=0), not_fill.argmax(axis=0))
    mosaic: np.ndarray = np.take_along_axis(block, idx[None, None], axis=0)[0]
    return mosaic


# ----------------------------------------------------------------------------------------------
# Seasonal composites: one observation (or the median) of several dates per pixel
# ----------------------------------------------------------------------------------------------

#: Composite rules, in the order of their codes in the compiled kernel.
COMPOSITE_RULES = ("min-ndsi", "latest", "median")


@_compiled(inline="always")
def _clamped_nd(x: np.float32, y: np.float32) -> np.float32:  # pragma: no cover - compiled
    """NDSI of one observation as ``normalized_difference`` computes it (negatives clipped to 0;
    NaN where masked or 0/0). ``x < 0`` tests, not ``max()``, so NaN stays NaN."""
    zero = np.float32(0)
    if x < zero:
        x = zero
    if y < zero:
        y = zero
    return (x - y) / (x + y)


@_compiled(**_JIT)
def _composite_pixels(refl: np.ndarray, ig: int, isw: int, rule: int, out: np.ndarray, count: np.ndarray,
                      chosen: np.ndarray, scratch: np.ndarray) -> None:  # pragma: no cover - compiled
    nt, nb, h, w = refl.shape
    nan = np.float32(np.nan)
    for r in range(h):
        for i in range(w):
            n = 0
            best = -1
            best_v = np.float32(np.inf)
            for k in range(nt):
                v = _clamped_nd(refl[k, ig, r, i], refl[k, isw, r, i])
                if np.isnan(v):  # not clear: masked (NaN) or undefined NDSI
                    continue
                n += 1
                if rule == 0:
                    if best < 0 or v < best_v:  # strict: a tie keeps the earliest
                        best = k
                        best_v = v
                else:
                    best = k  # the latest clear one so far
            count[r, i] = n
            if n == 0:
                chosen[r, i] = -1
                for j in range(nb):
                    out[j, r, i] = nan
                continue
            if rule != 2:
                chosen[r, i] = best
                for j in range(nb):
                    out[j, r, i] = refl[best, j, r, i]
                continue
            # Median: per band over the clear observations with a value in that band (a band can
            # be NaN alone, e.g. saturated); insertion sort, as nt is a handful of dates.
            chosen[r, i] = -1
            for j in range(nb):
                m = 0
                for k in range(nt):
                    if np.isnan(_clamped_nd(refl[k, ig, r, i], refl[k, isw, r, i])):
                        continue
                    b = refl[k, j, r, i]
                    if np.isnan(b):
                        continue
                    q = m
                    while q > 0 and scratch[q - 1] > b:
                        scratch[q] = scratch[q - 1]
                        q -= 1
                    scratch[q] = b
                    m += 1
                if m == 0:
                    out[j, r, i] = nan
                elif m % 2 == 1:
                    out[j, r, i] = scratch[m // 2]
                else:
                    out[j, r, i] = (scratch[m // 2 - 1] + scratch[m // 2]) / np.float32(2)


def composite(
    reflectance: np.ndarray,
    green: int,
    swir16: int,
    rule: str = "min-ndsi",
    *,
    out: np.ndarray | None = None,
    count_out: np.ndarray | None = None,
    index_out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Several dates of ``(time, band, y, x)`` reflectance -> one ``(band, y, x)`` composite.

    An observation is *clear* where its NDSI (``green`` and ``swir16`` are band positions) is
    defined, exactly as :func:`normalized_difference` computes it: not masked (NaN), and not
    both bands at or below 0. Rules:

    ``"min-ndsi"``
        The clear observation with the lowest NDSI, whole spectrum (so the bands stay one
        observation's and an index computed on the composite is that observation's); a tie
        keeps the earliest. The least snow a season showed: the glacier-inventory choice.
    ``"latest"``
        The last clear observation.
    ``"median"``
        Per band, the median of the clear observations that have a value in that band (the mean
        of the two middle values for an even count, in float32, as numpy's median). The result is
        no single observation, so the chosen index is -1 where it is defined.

    Returns ``(composite float32, clear count uint16, chosen time index int16)``; the composite
    is NaN and the index -1 where no observation is clear.
    """
    refl = np.asarray(reflectance, np.float32)
    if refl.ndim != 4:
        raise ValueError(f"reflectance must be (time, band, y, x), got shape {refl.shape}")
    nt, nb, h, w = refl.shape
    if rule not in COMPOSITE_RULES:
        raise ValueError(f"rule must be one of {COMPOSITE_RULES}, got {rule!r}")
    if not (0 <= green < nb and 0 <= swir16 < nb):
        raise ValueError(f"band positions {green}, {swir16} outside 0..{nb - 1}")
    if nt > np.iinfo(np.int16).max:
        raise ValueError(f"at most {np.iinfo(np.int16).max} time steps per composite, got {nt}")
    res = _out(out, (nb, h, w), np.float32)
    cnt = _out(count_out, (h, w), np.uint16)
    idx = _out(index_out, (h, w), np.int16)
    if res.size or cnt.size:
        _composite_pixels(refl, int(green), int(swir16), COMPOSITE_RULES.index(rule), res, cnt, idx,
                          np.empty(max(nt, 1), np.float32))
    return res, cnt, idx


# ----------------------------------------------------------------------------------------------
# Counting: confusion matrices, per-glacier counts, threshold histograms
# ----------------------------------------------------------------------------------------------


@_compiled(nogil=True, cache=True)
def _confusion_planes(pred: np.ndarray, ref: np.ndarray, valid: np.ndarray, by: np.ndarray, has_valid: bool,
                      has_by: bool, n_ids: int, counts: np.ndarray) -> None:  # pragma: no cover
    planes, h, w = pred.shape
    for p in range(planes):
        pr = p % ref.shape[0]
        pv = p % valid.shape[0]
        pb = p % by.shape[0]
        for r in range(h):
            for i in range(w):
                v = pred[p, r, i]
                t = ref[pr, r, i]
                if v > 1 or t > 1:
                    continue
                if has_valid and valid[pv, r, i] == 0:
                    continue
                code = 2 * np.int64(t) + np.int64(v)
                if has_by:
                    g = np.int64(by[pb, r, i])
                    if g < 0 or g > n_ids:
                        continue
                    code += 4 * g
                counts[p, code] += 1


def _as_uint8_codes(a: np.ndarray) -> np.ndarray:
    """0/1 class rasters as uint8; anything else (nodata, NaN, -1) becomes 255 (not counted)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.view(np.uint8)
    return np.where((a == 0) | (a == 1), a, ICE_NODATA).astype(np.uint8)


def confusion_counts(
    pred: np.ndarray,
    ref: np.ndarray,
    valid: np.ndarray | None = None,
    by: np.ndarray | None = None,
    n_ids: int = 0,
) -> np.ndarray:
    """Outcome counts per (y, x) slice: ``(*lead, 4 * (n_ids + 1))`` int64, one pass.

    ``pred`` and ``ref`` hold 0/1 (anything else is nodata and not counted); ``valid`` nonzero
    where a pixel may be scored; ``by`` glacier ids 0..n_ids (others dropped). Outcome code
    ``2 * ref + pred`` (order tn, fp, fn, tp), plus ``4 * id``.
    """
    pred = _as_uint8_codes(pred)
    shape = pred.shape
    lead = tuple(shape[:-2])
    k = 4 * (int(n_ids) + 1)
    counts = np.zeros((int(np.prod(lead)) if lead else 1, k), np.int64)
    if pred.size:
        _confusion_planes(
            _planes(pred, shape), _planes(_as_uint8_codes(ref), shape),
            _planes(np.asarray(valid) != 0, shape, np.uint8) if valid is not None else np.zeros((1, 1, 1), np.uint8),
            _planes(by, shape, np.int64) if by is not None else np.zeros((1, 1, 1), np.int64),
            valid is not None, by is not None, int(n_ids), counts,
        )
    return counts.reshape(*lead, k)


@_compiled(nogil=True, cache=True)
def _count_planes(mask: np.ndarray, ids: np.ndarray, value: _Int, n_ids: int, counts: np.ndarray) -> None:  # pragma: no cover - compiled
    planes, h, w = mask.shape
    for p in range(planes):
        pi = p % ids.shape[0]
        for r in range(h):
            for i in range(w):
                if mask[p, r, i] == value:
                    g = ids[pi, r, i]
                    if 0 <= g <= n_ids:
                        counts[g] += 1


def count_by_id(mask: np.ndarray, ids: np.ndarray, n_ids: int, value: int = 1) -> np.ndarray:
    """Pixels of ``mask == value`` per id 0..n_ids (id 0 = outside every outline): int64."""
    mask = np.asarray(mask)
    shape = mask.shape
    counts = np.zeros(int(n_ids) + 1, np.int64)
    if mask.size:
        _count_planes(_planes(mask, shape), _planes(ids, shape, np.int64), mask.dtype.type(value), int(n_ids), counts)
    return counts


#: Rows of :func:`glacier_stats`, in order.
GLACIER_STATS = ("pixels", "valid", "ice", "edges_x", "edges_y")


@_compiled(nogil=True, cache=True)
def _glacier_stats_planes(mask: np.ndarray, ids: np.ndarray, n_ids: int, halo: int, nodata: _Int,
                          counts: np.ndarray) -> None:  # pragma: no cover - compiled
    planes, h, w = mask.shape
    for p in range(planes):
        pi = p % ids.shape[0]
        for r in range(halo, h - halo):
            for i in range(halo, w - halo):
                g = ids[pi, r, i]
                if g < 0 or g > n_ids:
                    continue
                counts[p, 0, g] += 1
                v = mask[p, r, i]
                if v == nodata:
                    continue
                counts[p, 1, g] += 1
                if v != 1:
                    continue
                counts[p, 2, g] += 1
                # A side of an ice pixel of glacier g is on the perimeter of that glacier's ice
                # unless the neighbour across it is ice of the same glacier; the raster's edge
                # counts as "not ice".
                if i == 0 or not (mask[p, r, i - 1] == 1 and ids[pi, r, i - 1] == g):
                    counts[p, 3, g] += 1
                if i == w - 1 or not (mask[p, r, i + 1] == 1 and ids[pi, r, i + 1] == g):
                    counts[p, 3, g] += 1
                if r == 0 or not (mask[p, r - 1, i] == 1 and ids[pi, r - 1, i] == g):
                    counts[p, 4, g] += 1
                if r == h - 1 or not (mask[p, r + 1, i] == 1 and ids[pi, r + 1, i] == g):
                    counts[p, 4, g] += 1


def glacier_stats(mask: np.ndarray, ids: np.ndarray, n_ids: int, *, halo: int = 0) -> np.ndarray:
    """Per-glacier pixel counts and ice perimeter in one pass: ``(*lead, 5, n_ids + 1)`` int64.

    Rows (:data:`GLACIER_STATS`): ``pixels`` (pixels of the id: the outline's size), ``valid``
    (of those, not :data:`ICE_NODATA`), ``ice`` (== 1), ``edges_x`` and ``edges_y``: the sides
    between an ice pixel of glacier ``g`` and a horizontal (x) or vertical (y) neighbour that is
    not ice of ``g`` (no ice, nodata, another glacier, or beyond the raster). ``edges_x`` sides
    are one pixel high, ``edges_y`` sides one pixel wide, so ``edges_x * |dy| + edges_y * |dx|``
    is the perimeter of glacier ``g``'s mapped ice, traced along pixel edges: the raster's own,
    exact perimeter of the set it maps, which the buffer method of area uncertainty needs.

    Parameters
    ----------
    mask
        uint8 ice mask ``(..., y, x)``: 1 ice, 0 not, :data:`ICE_NODATA` nodata.
    ids
        Glacier ids ``(y, x)`` or like ``mask``: 0..n_ids (others are not counted).
    n_ids
        Largest id.
    halo
        Rows and columns on every side that are neighbours only (a dask block grown by
        ``map_overlap``): pixels there are not counted but are looked at across the sides of
        the pixels inside, so per-block results sum to the whole raster's exactly. Pad the
        raster's own border with 0 (not ice) to match an unpadded whole-raster count.
    """
    mask = np.asarray(mask)
    shape = mask.shape
    lead = tuple(shape[:-2])
    counts = np.zeros((int(np.prod(lead)) if lead else 1, len(GLACIER_STATS), int(n_ids) + 1), np.int64)
    if mask.size:
        _glacier_stats_planes(_planes(mask, shape, np.uint8), _planes(ids, shape, np.int64), int(n_ids),
                              int(halo), np.uint8(ICE_NODATA), counts)
    return counts.reshape(*lead, len(GLACIER_STATS), int(n_ids) + 1)


def threshold_histogram(index: np.ndarray, edges: np.ndarray, ref: np.ndarray | None = None,
                        valid: np.ndarray | None = None) -> np.ndarray:
    """Counts of ``index`` in open-ended bins, per leading row and reference class.

    Returns ``(*lead, k)`` int64 with ``k = len(edges) + 1`` without ``ref``, else ``2 * k``
    (reference 0, then 1). Bin ``j`` holds ``edges[j-1] <= index < edges[j]``
    (``searchsorted(side="right")``, compared in float32), so the pixels at or above threshold
    ``edges[j]`` are a suffix sum: exactly the rule ``index >= threshold`` of :func:`ice_mask`.
    NaN index, ``ref`` outside 0/1 and ``valid == 0`` are not counted.
    """
    idx = np.asarray(index, np.float32)
    shape = idx.shape
    lead = shape[:-2] if len(shape) >= 2 else ()
    n_rows = int(np.prod(lead)) if lead else 1
    m1 = edges.size + 1
    ok = ~np.isnan(idx)
    code = np.searchsorted(edges, np.where(ok, idx, np.float32(0)), side="right").astype(np.int64)
    k = m1
    if ref is not None:
        r = np.broadcast_to(np.asarray(ref), shape)
        ok &= (r == 0) | (r == 1)
        code += (r == 1).astype(np.int64) * m1
        k = 2 * m1
    if valid is not None:
        ok &= np.broadcast_to(np.asarray(valid) != 0, shape)
    # One bincount for all rows: offset each row's codes by row * k.
    code = code.reshape(n_rows, -1) + (np.arange(n_rows, dtype=np.int64) * k)[:, None]
    counts = np.bincount(code[ok.reshape(n_rows, -1)], minlength=n_rows * k)
    return counts.reshape(*lead, k)
