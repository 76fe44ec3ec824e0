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

* **Shapes.** Inputs are ``(..., y, x)``. A kernel flattens them to ``(rows, pixels)``; an input
  whose leading size is 1 (a DEM ``(y, x)`` beside bands ``(time, y, x)``) is read for every row
  without being broadcast in memory.
* **Outputs.** Every kernel accepts ``out=`` and writes into it: a caller that owns the
  destination (a preallocated array, a Zarr region buffer) pays no allocation and no copy.
* **NaN** is nodata for reflectance and indices; :data:`ICE_NODATA` for ice masks;
  :data:`QA_FILL` for QA_PIXEL.
"""

from __future__ import annotations

import numpy as np

try:  # numba is a core dependency; the import is here, not at `import icemap`.
    from numba import njit
except ImportError as exc:  # pragma: no cover - a broken install
    raise ImportError("icemap's kernels need numba: pip install numba (it is a dependency of icemap)") from exc

__all__ = [
    "ICE_NODATA",
    "QA_FILL",
    "NO_GLACIER",
    "DEFAULT_CHUNKSIZE",
    "DEFAULT_TILE",
    "DEFAULT_NDSI_THRESHOLD",
    "normalized_difference",
    "ice_mask",
    "scale_mask",
    "qa_to_uint16",
    "mosaic_first_valid",
    "confusion_counts",
    "count_by_id",
    "threshold_histogram",
]

#: Ice masks: 0 no ice, 1 ice, 255 nodata (cloud, fill, undecided guard). Stored as the
#: Zarr/COG fill value of every uint8 product.
ICE_NODATA = np.uint8(255)
#: QA_PIXEL value of fill pixels (bit 0 alone): the store's fill value for ``qa_pixel``.
QA_FILL = np.uint16(1)
#: Glacier-id raster value outside every outline.
NO_GLACIER = 0
#: Spatial chunk edge in pixels: one band of one scene per chunk is 4 MiB of float32, large
#: enough that per-task overhead is < 1 % of a chunk's I/O, small enough for 2 GiB workers.
DEFAULT_CHUNKSIZE = 1024
#: U-Net output tile edge within a chunk (multiples of 2**depth; measured in docs/benchmarks.md).
DEFAULT_TILE = 256
#: The literature's NDSI threshold; studies a and b found 0.2 and 0.1 best on their scenes.
DEFAULT_NDSI_THRESHOLD = 0.4

_JIT = dict(nogil=True, cache=True, error_model="numpy")
# A 1x1 stand-in for optional inputs that are switched off: numba compiles one specialisation
# per type signature, so optional arrays are always arrays, and their flag decides if they are read.
_NO_F32 = np.zeros((1, 1), np.float32)


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------


def _pixels(shape: tuple[int, ...]) -> int:
    if len(shape) >= 2:
        return int(shape[-2]) * int(shape[-1])
    return int(shape[-1]) if shape else 1


def _lead(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape[:-2])) if len(shape) >= 2 else 1


def _rows(a: np.ndarray, shape: tuple[int, ...], dtype: np.dtype | type | None = None) -> np.ndarray:
    """``a`` as a C-contiguous ``(rows, pixels)`` array for an output of ``shape``.

    ``rows`` is the output's or 1 (then the kernel reuses row 0 for every output row). Only a
    non-contiguous or differently typed input is copied.
    """
    a = np.asarray(a) if dtype is None else np.asarray(a, dtype=dtype)
    n = _pixels(shape)
    if a.shape == shape:
        return np.ascontiguousarray(a).reshape(_lead(shape), n)
    if a.size == n and tuple(a.shape[-2:]) == tuple(shape[-2:]):
        return np.ascontiguousarray(a).reshape(1, n)
    return np.ascontiguousarray(np.broadcast_to(a, shape)).reshape(_lead(shape), n)


def _out(out: np.ndarray | None, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype)
    if out.shape != shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype)} array of shape {shape}, "
                         f"got {out.dtype} {out.shape}")
    return out


# ----------------------------------------------------------------------------------------------
# Normalised differences and the NDSI ice mask
# ----------------------------------------------------------------------------------------------


@njit(**_JIT)
def _nd_rows(a, b, out):  # pragma: no cover - compiled
    rows, n = out.shape
    zero = np.float32(0)
    for r in range(rows):
        ra = r if a.shape[0] > 1 else 0
        rb = r if b.shape[0] > 1 else 0
        for i in range(n):
            x = a[ra, i]
            y = b[rb, i]
            if x < zero:  # NaN compares False and stays NaN, as np.maximum propagates it
                x = zero
            if y < zero:
                y = zero
            out[r, i] = (x - y) / (x + y)  # 0/0 -> NaN (numpy error model)


def normalized_difference(a: np.ndarray, b: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """``(a - b) / (a + b)`` in float32, robust to the quirks of surface reflectance.

    Negative reflectances (atmospheric over-correction in dark pixels) are clipped to 0 before
    the ratio, so the result stays within [-1, 1]; where both are 0 the ratio is undefined and
    NaN, as for NaN inputs. One pass, no temporaries.
    """
    shape = np.broadcast_shapes(np.shape(a), np.shape(b))
    res = _out(out, shape, np.float32)
    _nd_rows(_rows(a, shape, np.float32), _rows(b, shape, np.float32), res.reshape(_lead(shape), _pixels(shape)))
    return res


@njit(**_JIT)
def _ice_rows(g, s, nir, elev, slope, threshold, nir_min, ndwi_max, green_min, elev_min, slope_max,
              out, ndsi_out, write_ndsi):  # pragma: no cover - compiled
    rows, n = out.shape
    zero = np.float32(0)
    water = not (np.isnan(nir_min) and np.isnan(ndwi_max))
    for r in range(rows):
        rg = r if g.shape[0] > 1 else 0
        rs = r if s.shape[0] > 1 else 0
        rn = r if nir.shape[0] > 1 else 0
        re = r if elev.shape[0] > 1 else 0
        rl = r if slope.shape[0] > 1 else 0
        for i in range(n):
            green = g[rg, i]
            x = green
            y = s[rs, i]
            if x < zero:
                x = zero
            if y < zero:
                y = zero
            idx = (x - y) / (x + y)
            if write_ndsi:
                ndsi_out[r, i] = idx
            if np.isnan(idx):
                out[r, i] = 255
                continue
            if not idx >= threshold:
                out[r, i] = 0
                continue
            # An NDSI ice candidate: a guard that rejects it wins; a guard that cannot test it
            # (its input is NaN) makes it nodata; otherwise it is ice.
            rejected = False
            unknown = False
            if water:
                v = nir[rn, i]
                if np.isnan(v):
                    unknown = True
                if v < nir_min:
                    rejected = True
                if not np.isnan(ndwi_max):
                    gw = green if not green < zero else zero  # clip as _nd_rows: NaN stays NaN
                    vw = v if not v < zero else zero
                    if (gw - vw) / (gw + vw) > ndwi_max:
                        rejected = True
            if green < green_min:
                rejected = True
            if not np.isnan(elev_min):
                e = elev[re, i]
                if np.isnan(e):
                    unknown = True
                elif e < elev_min:
                    rejected = True
            if not np.isnan(slope_max):
                sl = slope[rl, i]
                if np.isnan(sl):
                    unknown = True
                elif sl > slope_max:
                    rejected = True
            if rejected:
                out[r, i] = 0
            elif unknown:
                out[r, i] = 255
            else:
                out[r, i] = 1


def ice_mask(
    green: np.ndarray,
    swir16: np.ndarray,
    threshold: float = DEFAULT_NDSI_THRESHOLD,
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
    n = _pixels(shape)
    nd = _out(ndsi_out, shape, np.float32) if ndsi_out is not None else _NO_F32.reshape(1, 1)

    def opt(a: np.ndarray | None, param: float | None, what: str) -> np.ndarray:
        if param is None:
            return _NO_F32
        if a is None:
            raise ValueError(f"{what} is needed by an active guard")
        return _rows(a, shape, np.float32)

    def num(v: float | None) -> np.float32:
        return np.float32(np.nan) if v is None else np.float32(v)

    water_on = nir_min is not None or ndwi_max is not None
    _ice_rows(
        _rows(green, shape, np.float32), _rows(swir16, shape, np.float32),
        opt(nir08, 0.0 if water_on else None, "nir08"),
        opt(elevation, elevation_min_m, "elevation"), opt(slope, slope_max_deg, "slope"),
        np.float32(threshold), num(nir_min), num(ndwi_max), num(green_min), num(elevation_min_m),
        num(slope_max_deg), res.reshape(_lead(shape), n), nd.reshape(_lead(shape), n) if ndsi_out is not None else nd,
        ndsi_out is not None,
    )
    return res


# ----------------------------------------------------------------------------------------------
# Loading: DN -> reflectance with QA_PIXEL / QA_RADSAT masks
# ----------------------------------------------------------------------------------------------


@njit(**_JIT)
def _scale_mask_rows(dn, qa, radsat, scale, offset, qa_bits, sat_bits, has_qa, has_radsat, out):  # pragma: no cover
    rows, n = out.shape
    nan = np.float32(np.nan)
    for r in range(rows):
        rq = r if qa.shape[0] > 1 else 0
        rr = r if radsat.shape[0] > 1 else 0
        sc = scale[r if scale.shape[0] > 1 else 0]
        of = offset[r if offset.shape[0] > 1 else 0]
        for i in range(n):
            v = dn[r, i]
            if np.isnan(v):
                out[r, i] = nan
                continue
            if has_qa:
                q = qa[rq, i]
                bits = np.uint16(1) if np.isnan(q) else np.uint16(q)  # unread QA is fill
                if bits & qa_bits:
                    out[r, i] = nan
                    continue
            if has_radsat:
                q = radsat[rr, i]
                if not np.isnan(q) and (np.uint16(q) & sat_bits):
                    out[r, i] = nan
                    continue
            out[r, i] = v * sc + of


def scale_mask(
    dn: np.ndarray,
    scale: np.ndarray | float,
    offset: np.ndarray | float,
    *,
    qa: np.ndarray | None = None,
    qa_bits: int = 0,
    radsat: np.ndarray | None = None,
    sat_bits: int = 0,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Digital numbers (float32, NaN = not read) -> reflectance ``dn * scale + offset``, masked.

    NaN where ``dn`` is NaN, where ``qa`` (QA_PIXEL as read, float32; NaN counts as fill) has any
    of ``qa_bits``, or where ``radsat`` (QA_RADSAT) has any of ``sat_bits`` (the bit of this
    band). ``scale``/``offset`` are scalars or one value per leading row (per item). Float32
    throughout, so a stored cube equals ``DN * scale + offset`` computed in float32.
    """
    shape = np.shape(dn)
    res = _out(out, shape, np.float32)
    rows = _rows(dn, shape, np.float32)
    sc = np.ascontiguousarray(np.asarray(scale, np.float32).reshape(-1))
    of = np.ascontiguousarray(np.asarray(offset, np.float32).reshape(-1))
    _scale_mask_rows(
        rows,
        _NO_F32 if qa is None else _rows(qa, shape, np.float32),
        _NO_F32 if radsat is None else _rows(radsat, shape, np.float32),
        sc, of, np.uint16(qa_bits), np.uint16(sat_bits), qa is not None, radsat is not None,
        res.reshape(rows.shape),
    )
    return res


@njit(**_JIT)
def _qa_rows(qa, out):  # pragma: no cover - compiled
    rows, n = out.shape
    for r in range(rows):
        for i in range(n):
            q = qa[r, i]
            out[r, i] = np.uint16(1) if np.isnan(q) else np.uint16(q)


def qa_to_uint16(qa: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """QA_PIXEL read as float32 (NaN where nothing was read) -> uint16, NaN -> :data:`QA_FILL`."""
    shape = np.shape(qa)
    res = _out(out, shape, np.uint16)
    rows = _rows(qa, shape, np.float32)
    _qa_rows(rows, res.reshape(rows.shape))
    return res


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
    return np.take_along_axis(block, idx[None, None], axis=0)[0]


# ----------------------------------------------------------------------------------------------
# Counting: confusion matrices, per-glacier counts, threshold histograms
# ----------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _confusion_rows(pred, ref, valid, by, has_valid, has_by, n_ids, counts):  # pragma: no cover
    rows, n = pred.shape
    for r in range(rows):
        rr = r if ref.shape[0] > 1 else 0
        rv = r if valid.shape[0] > 1 else 0
        rb = r if by.shape[0] > 1 else 0
        for i in range(n):
            p = pred[r, i]
            t = ref[rr, i]
            if p > 1 or t > 1:
                continue
            if has_valid and valid[rv, i] == 0:
                continue
            code = 2 * np.int64(t) + np.int64(p)
            if has_by:
                g = np.int64(by[rb, i])
                if g < 0 or g > n_ids:
                    continue
                code += 4 * g
            counts[r, code] += 1


def _as_uint8_codes(a: np.ndarray) -> np.ndarray:
    """0/1 class rasters as uint8; anything else (nodata, NaN, -1) becomes 255 (not counted)."""
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.view(np.uint8)
    return np.where((a == 0) | (a == 1), a, 255).astype(np.uint8)


def confusion_counts(
    pred: np.ndarray,
    ref: np.ndarray,
    valid: np.ndarray | None = None,
    by: np.ndarray | None = None,
    n_ids: int = 0,
) -> np.ndarray:
    """Outcome counts per leading row: ``(*lead, 4 * (n_ids + 1))`` int64, one pass.

    ``pred`` and ``ref`` hold 0/1 (anything else is nodata and not counted); ``valid`` nonzero
    where a pixel may be scored; ``by`` glacier ids 0..n_ids (others dropped). Outcome code
    ``2 * ref + pred`` (order tn, fp, fn, tp), plus ``4 * id``.
    """
    pred = _as_uint8_codes(pred)
    shape = pred.shape
    lead = shape[:-2] if len(shape) >= 2 else ()
    n = _pixels(shape)
    k = 4 * (int(n_ids) + 1)
    counts = np.zeros((int(np.prod(lead)) if lead else 1, k), np.int64)
    if n:
        _confusion_rows(
            _rows(pred, shape), _rows(_as_uint8_codes(ref), shape),
            _rows(np.asarray(valid) != 0, shape, np.uint8) if valid is not None else np.zeros((1, 1), np.uint8),
            _rows(by, shape, np.int64) if by is not None else np.zeros((1, 1), np.int64),
            valid is not None, by is not None, int(n_ids), counts,
        )
    return counts.reshape(*lead, k)


@njit(nogil=True, cache=True)
def _count_rows(mask, ids, value, n_ids, counts):  # pragma: no cover - compiled
    rows, n = mask.shape
    for r in range(rows):
        ri = r if ids.shape[0] > 1 else 0
        for i in range(n):
            if mask[r, i] == value:
                g = ids[ri, i]
                if 0 <= g <= n_ids:
                    counts[g] += 1


def count_by_id(mask: np.ndarray, ids: np.ndarray, n_ids: int, value: int = 1) -> np.ndarray:
    """Pixels of ``mask == value`` per id 0..n_ids (id 0 = outside every outline): int64."""
    mask = np.asarray(mask)
    shape = mask.shape
    counts = np.zeros(int(n_ids) + 1, np.int64)
    if mask.size:
        _count_rows(_rows(mask, shape), _rows(ids, shape, np.int64), mask.dtype.type(value), int(n_ids), counts)
    return counts


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
