"""Radiometric augmentation of training batches: the default model's, for any model.

:class:`SpectralAugment` widens what a U-Net sees beyond the scenes it is trained on: sensor
band responses, TOA versus surface reflectance, illumination, terrain shading, haze, turbid
water and noise. The shipped default model is trained with it (:mod:`icemap.lab.default`),
and ``icemap train --augment spectral`` applies the same augmentation to a user's own training,
so a model fine-tuned from the default one keeps the robustness it was trained for.

It lives here, apart from the default model's recipe, so both use one definition. No torch at
import (torch is imported when a batch is augmented).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from icemap.errors import ModelError

__all__ = ["AUGMENT_BANDS", "HAZE_SHAPE", "TURBID_SHAPE", "SpectralAugment", "check_augment_channels"]

#: The reflectance bands the augmentation knows (their haze and sediment spectra below).
AUGMENT_BANDS: tuple[str, ...] = ("blue", "green", "red", "nir08", "swir16", "swir22")
#: The derived channels it recomputes from the changed bands (others are refused).
_INDICES: dict[str, tuple[str, str]] = {"ndsi": ("green", "swir16"), "ndwi": ("green", "nir08")}

#: Relative haze (path radiance) per band, ~ wavelength^-2 (Rayleigh-like, between Rayleigh's
#: -4 and the -1 of aerosols): blue 0.48, green 0.56, red 0.655, NIR 0.865, SWIR 1.61/2.2 um.
HAZE_SHAPE: tuple[float, ...] = tuple(round((0.48 / w) ** 2, 3) for w in (0.48, 0.56, 0.655, 0.865, 1.61, 2.2))

#: Reflectance added by suspended sediment, relative to green (turbid river and estuary
#: spectra: highest in green and red, some NIR, almost nothing in SWIR, which water absorbs).
TURBID_SHAPE: tuple[float, ...] = (0.7, 1.0, 0.9, 0.5, 0.08, 0.04)

_DEFAULT_CHANNELS: tuple[str, ...] = AUGMENT_BANDS + ("ndsi", "ndwi")


def check_augment_channels(channels: Sequence[str]) -> None:
    """Raise :class:`ModelError` unless :class:`SpectralAugment` can augment ``channels``.

    It works in reflectance: the bands must come first (any of :data:`AUGMENT_BANDS`, in any
    order), followed only by indices it can recompute from them (``ndsi``, ``ndwi``). Terrain
    channels (elevation, slope) and other bands (coastal, thermal) have no radiometric model.
    """
    ch = list(channels)
    nb = 0
    while nb < len(ch) and ch[nb] in AUGMENT_BANDS:
        nb += 1
    bad = [c for c in ch[nb:] if c not in _INDICES]
    if nb == 0 or bad:
        raise ModelError(
            f"spectral augmentation works on the bands {', '.join(AUGMENT_BANDS)} followed by ndsi/ndwi; "
            f"the inputs {ch} have {bad or ch} it cannot change consistently. Use --augment flips, "
            "or inputs such as b3_b6 or blue,green,red,nir08,swir16,swir22,ndsi,ndwi"
        )
    for name in ch[nb:]:
        missing = [b for b in _INDICES[name] if b not in ch[:nb]]
        if missing:
            raise ModelError(f"spectral augmentation recomputes {name} from {missing}, which the inputs {ch} lack; "
                             "add those bands to --inputs or use --augment flips")


@dataclass
class SpectralAugment:
    """Random radiometric changes of a training batch, applied in reflectance units.

    Every chip draws, from the epoch's generator: a global illumination factor
    (``illumination``, e.g. sun elevation and slope), with probability ``p_shading`` a smooth
    multiplicative shading field (``shading``: a 4 x 4 field of factors upsampled to the chip,
    the scale of ridges and valleys), per-band gains with standard deviation ``band_gain_sd``
    (Landsat OLI versus HLS versus Sentinel-2 MSI band responses and TOA versus surface
    reflectance differ by a few percent per band), per-band offsets ``band_offset_sd``, with
    probability ``p_haze`` an additive haze of up to ``haze_max`` in blue falling off as
    :data:`HAZE_SHAPE`, and gaussian noise of up to ``noise_max``. With probability
    ``p_turbid`` the chip's water (NDWI > 0.2 and NIR < 0.08: the generator's clear lakes) gets
    suspended sediment, up to ``turbid_max`` in green with the spectrum of :data:`TURBID_SHAPE`
    in a smooth field: real rivers, estuaries and glacier lakes are brighter in the visible
    and NIR than the generator's lakes, and bright water at high NDSI is NDSI's classic false
    positive (it needs green and NIR among the inputs). NDSI and NDWI are recomputed from the
    changed bands, so the indices stay consistent with them. Pixels that were nodata (or
    padding) are left untouched.

    ``channels`` are the model's inputs in order (:func:`check_augment_channels` says which
    work); the default is the default model's eight. For those eight the random draws are the
    ones the default model was trained with, so its recipe reproduces.
    """

    illumination: tuple[float, float] = (0.65, 1.25)
    p_shading: float = 0.5
    shading: tuple[float, float] = (0.45, 1.1)
    band_gain_sd: float = 0.06
    band_offset_sd: float = 0.008
    p_haze: float = 0.4
    haze_max: float = 0.08
    noise_max: float = 0.012
    p_turbid: float = 0.6
    turbid_max: float = 0.12
    channels: tuple[str, ...] = _DEFAULT_CHANNELS

    def __post_init__(self) -> None:
        self.channels = tuple(self.channels)
        check_augment_channels(self.channels)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["haze_shape"] = list(HAZE_SHAPE)
        return d

    def __call__(self, x: Any, valid: Any, norm: Any, rng: np.random.Generator) -> Any:
        """Augment normalised inputs ``x`` (B, C, H, W); ``valid`` (B, 1, H, W) marks real pixels."""
        import torch
        import torch.nn.functional as F

        b, c, h, w = x.shape
        ch = list(self.channels)
        if c != len(ch):
            raise ModelError(f"the batch has {c} channels but the augmentation was set up for {ch}")
        nb = next((i for i, n in enumerate(ch) if n not in AUGMENT_BANDS), len(ch))
        bands = ch[:nb]
        haze_shape = torch.as_tensor([HAZE_SHAPE[AUGMENT_BANDS.index(n)] for n in bands])
        turbid_shape = torch.as_tensor([TURBID_SHAPE[AUGMENT_BANDS.index(n)] for n in bands])
        lo = torch.as_tensor(np.asarray(norm.lo), dtype=x.dtype).view(1, c, 1, 1)
        span = torch.as_tensor(np.asarray(norm.hi) - np.asarray(norm.lo), dtype=x.dtype).view(1, c, 1, 1)
        refl = (x * span + lo)[:, :nb]

        def f(a: Any) -> Any:
            return torch.as_tensor(np.asarray(a, dtype=np.float32))

        # The draws keep the default model's order (turbid, gains, shading, haze, offsets,
        # noise), so its recipe draws the same numbers as before this class moved here.
        if self.p_turbid > 0 and {"green", "nir08"} <= set(bands):
            g0, n0 = refl[:, ch.index("green")].clamp_min(0), refl[:, ch.index("nir08")].clamp_min(0)
            water = ((g0 - n0) > 0.2 * (g0 + n0)) & (n0 < 0.08)
            amount = f(rng.uniform(0, self.turbid_max, size=(b, 1, 1, 1)) * (rng.random(size=(b, 1, 1, 1)) < self.p_turbid))
            field = F.interpolate(f(rng.uniform(0.3, 1.0, size=(b, 1, 4, 4))), size=(h, w), mode="bilinear",
                                  align_corners=False)
            sediment = amount * field * turbid_shape.view(1, nb, 1, 1)
            refl = refl + water[:, None].to(refl.dtype) * sediment
        gain = f(rng.uniform(*self.illumination, size=(b, 1, 1, 1)))
        gain = gain * f(rng.normal(1.0, self.band_gain_sd, size=(b, nb, 1, 1))).clamp(0.8, 1.2)
        coarse = f(rng.uniform(*self.shading, size=(b, 1, 4, 4)))
        shade = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).clamp(0.3, 1.2)
        use_shade = f(rng.random(size=(b, 1, 1, 1)) < self.p_shading)
        shade = use_shade * shade + (1 - use_shade)
        haze = f(rng.uniform(0, self.haze_max, size=(b, 1, 1, 1)) * (rng.random(size=(b, 1, 1, 1)) < self.p_haze))
        haze = haze * haze_shape.view(1, nb, 1, 1)
        offset = f(rng.normal(0.0, self.band_offset_sd, size=(b, nb, 1, 1)))
        sigma = f(rng.uniform(0, self.noise_max, size=(b, 1, 1, 1)))
        noise = f(rng.standard_normal(size=(b, nb, h, w))) * sigma
        new = refl * gain * shade + haze + offset + noise
        out = [new[:, i] for i in range(nb)]
        for name in ch[nb:]:
            a_name, b_name = _INDICES[name]
            g, other = new[:, ch.index(a_name)].clamp_min(0), new[:, ch.index(b_name)].clamp_min(0)
            out.append(torch.where(g + other > 0, (g - other) / (g + other).clamp_min(1e-6), torch.zeros_like(g)))
        z = (torch.stack(out, dim=1) - lo) / span
        return torch.where(valid.expand_as(x), z, x)
