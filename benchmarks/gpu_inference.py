#!/usr/bin/env python
"""GPU figures for icemap's U-Net inference: CPU/GPU agreement and throughput, as JSON.

Made for a lent GPU machine (H100/H200) with no internet: it needs only numpy, torch (with
CUDA) and icemap's source tree, imported from ``src``. Run from the repository root::

    PYTHONPATH=src python benchmarks/gpu_inference.py --out gpu.json

Nothing else from icemap's dependencies is needed: the input is a synthetic scene made in
process (smooth random fields, with a few NaN holes as clouds), and when ``safetensors`` is
missing the model is handed to icemap's per-process model cache directly instead of being
read from a checkpoint. The whole run fits one 10-minute call (about 2-4 minutes on an H100;
``--quick`` for a 1-minute check).

What it measures:

1. **Agreement.** :func:`icemap.infer.predict_array` on the same window on CPU (float32) and
   on CUDA (bf16 autocast, as icemap runs it there): max and mean absolute difference of the
   probabilities and agreement of the 0.5-thresholded masks, against tolerances suited to
   bf16 (mean |diff| <= 0.01, masks agree on >= 99 % of pixels). A plain float32 CUDA pass
   (TF32 off) is compared too: it must match the CPU to about 1e-4.
2. **Throughput.** icemap's path (``predict_array`` with exact halos, batches, bf16 autocast,
   pinned host memory, non-blocking copies) against a plain PyTorch sliding-window loop on the
   same GPU, the same model, tiles and batch size (float32 and bf16 autocast): tiles/s, useful
   Mpixel/s and network pixels per useful pixel, best of a few runs after a warm-up, with
   ``torch.cuda.synchronize()`` before every clock read.

Output: one JSON document on stdout (and in ``--out``), with the device, versions and every
number; ``docs/benchmarks.md`` explains how to read it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))


def synthetic_scene(channels: int, size: int, seed: int = 0, cloud_share: float = 0.05) -> np.ndarray:
    """``(C, size, size)`` float32 reflectance-like fields (smooth, 0-0.6) with NaN cloud holes."""
    rng = np.random.default_rng(seed)
    ky = np.fft.fftfreq(size)[:, None]
    kx = np.fft.rfftfreq(size)[None, :]
    k = np.sqrt(ky**2 + kx**2)
    k[0, 0] = 1.0
    out = np.empty((channels, size, size), np.float32)
    for c in range(channels):
        spec = (rng.normal(size=k.shape) + 1j * rng.normal(size=k.shape)) / k**1.6
        field = np.fft.irfft2(spec, s=(size, size))
        field = (field - field.min()) / (np.ptp(field) + 1e-12)
        out[c] = (0.6 * field).astype(np.float32)
    clouds = rng.random((size // 32 + 1, size // 32 + 1)) < cloud_share
    mask = np.kron(clouds, np.ones((32, 32), bool))[:size, :size]
    out[:, mask] = np.nan
    return out


def build_model(channels: int, depth: int, base: int, seed: int = 0) -> Any:
    """A U-Net with random but fixed weights and batch-norm statistics, in eval mode."""
    import torch

    from icemap.model.unet import UNet, UNetConfig

    torch.manual_seed(seed)
    model = UNet(UNetConfig(in_channels=channels, depth=depth, base=base))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def model_ref(model: Any, workdir: Path) -> Any:
    """A :class:`icemap.infer.ModelRef` for ``model``: a real checkpoint when safetensors is
    installed, else a reference whose CPU and CUDA copies are put in icemap's model cache."""
    import copy

    from icemap import infer

    try:
        from icemap.model.checkpoint import CheckpointMeta, save_checkpoint
        from icemap.model.inputs import Normalisation

        c = model.config.in_channels
        meta = CheckpointMeta(architecture={}, channels=[f"c{i}" for i in range(c)], bands=[],
                              normalisation=Normalisation([0.0] * c, [0.6] * c).to_dict())
        folder = save_checkpoint(model, meta, workdir / "model")
        return infer.ModelRef.from_path(folder), "checkpoint (safetensors)"
    except ImportError:
        ref = infer.ModelRef(str(workdir / "in-memory-model"), "0" * 64)
        import torch

        for device in ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",):
            infer._CACHE[(ref.path, ref.sha256, device)] = copy.deepcopy(model).to(device).eval()
        return ref, "in-memory (safetensors missing)"


def plain_loop(x: np.ndarray, model: Any, *, tile: int, halo: int, batch: int, device: str,
               autocast: bool) -> tuple[np.ndarray, int, int]:
    """The usual script: normalise, pad, fixed windows at stride ``tile``, batch, stitch."""
    import torch

    C, H, W = x.shape
    z = x / np.float32(0.6)
    nodata = np.isnan(z).any(axis=0)
    z = np.nan_to_num(z, nan=0.0).astype(np.float32)
    Hp, Wp = -(-H // tile) * tile, -(-W // tile) * tile
    win = tile + 2 * halo
    padded = np.zeros((C, Hp + 2 * halo, Wp + 2 * halo), np.float32)
    padded[:, halo:halo + H, halo:halo + W] = z
    origins = [(ty, tx) for ty in range(0, Hp, tile) for tx in range(0, Wp, tile)]
    out = np.empty((Hp, Wp), np.float32)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast and device == "cuda" else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        for i in range(0, len(origins), batch):
            part = origins[i:i + batch]
            xb = torch.from_numpy(np.stack([padded[:, ty:ty + win, tx:tx + win] for ty, tx in part])).to(device)
            prob = torch.sigmoid(model(xb).float())[:, 0, halo:halo + tile, halo:halo + tile].cpu().numpy()
            for (ty, tx), p in zip(part, prob):
                out[ty:ty + tile, tx:tx + tile] = p
    out = out[:H, :W]
    out[nodata] = np.nan
    return out, len(origins), len(origins) * win * win


def icemap_work(H: int, W: int, halo: int, tile: int, m: int) -> tuple[int, int]:
    """Tiles and network pixels :func:`predict_array` computes on a whole ``H x W`` array."""
    def axis(n: int) -> list[int]:
        sizes = []
        for t in range(0, n, tile):
            t1 = min(t + tile, n)
            w0, w1 = max(0, t - halo), min(n, t1 + halo)
            sizes.append(-(-(w1 - w0) // m) * m)
        return sizes

    ys, xs = axis(H), axis(W)
    return len(ys) * len(xs), sum(ys) * sum(xs)


def timed(fn: Callable[[], Any], repeat: int, cuda: bool) -> float:
    import torch

    fn()  # warm-up: cuDNN autotuning, allocator, model cache
    best = math.inf
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--size", type=int, help="scene edge in pixels for throughput (4096; --quick 1024)")
    parser.add_argument("--check-size", type=int, help="scene edge for the CPU/GPU agreement (768; --quick 256)")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--base", type=int, default=32)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--tiles", help="comma-separated tile sizes to measure (256,512; --quick 256)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeat", type=int, help="timed runs per configuration (3; --quick 1)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a 1-minute check")
    parser.add_argument("--allow-cpu", action="store_true",
                        help="without CUDA, run every step on the CPU (tests the script itself; no GPU figures)")
    args = parser.parse_args(argv)
    defaults = {"size": (4096, 1024), "check_size": (768, 256), "repeat": (3, 1), "tiles": ("256,512", "256")}
    for name, (full, quick) in defaults.items():  # --quick changes only what was not given
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)

    import torch

    from icemap import infer
    from icemap.infer import default_halo, predict_array
    from icemap.model.inputs import Normalisation

    try:
        import dask  # noqa: F401
    except ImportError:
        # predict_array's CPU thread sizing asks dask how many threads it runs; without dask
        # (a bare GPU image) there is only this process: give torch every core.
        infer._set_cpu_threads = lambda: None  # type: ignore[attr-defined]

    started = time.time()
    report: dict[str, Any] = {
        "script": "benchmarks/gpu_inference.py", "argv": sys.argv[1:] if argv is None else argv,
        "platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "numpy": np.__version__, "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        dev = "cuda"
        report["device"] = torch.cuda.get_device_name(0)
        report["cuda"] = torch.version.cuda
        report["bf16_supported"] = torch.cuda.is_bf16_supported()
        torch.backends.cudnn.benchmark = True
    elif args.allow_cpu:
        dev = "cpu"
        report["device"] = "cpu (--allow-cpu: a test of the script, not GPU figures)"
    else:
        report["error"] = "no CUDA device visible to torch; run this on a GPU machine (or --allow-cpu to test)"
        print(json.dumps(report, indent=2))
        return 2
    cuda = dev == "cuda"

    model = build_model(args.channels, args.depth, args.base)
    m = 2**args.depth
    halo = default_halo(args.depth, model.config.receptive_field)
    norm = Normalisation([0.0] * args.channels, [0.6] * args.channels)
    report["model"] = {"depth": args.depth, "base": args.base, "channels": args.channels,
                       "receptive_field": model.config.receptive_field, "exact_halo": halo,
                       "parameters": sum(p.numel() for p in model.parameters())}
    with tempfile.TemporaryDirectory() as tmp:
        ref, how = model_ref(model, Path(tmp))
        report["model"]["loaded_as"] = how
        gpu_model = build_model(args.channels, args.depth, args.base).to(dev)

        # 1. agreement: CPU float32 vs CUDA (bf16 autocast, icemap's path) vs CUDA float32
        x = synthetic_scene(args.channels, args.check_size, seed=1)
        torch.set_num_threads(os.cpu_count() or 1)
        kw: dict[str, Any] = {"depth": args.depth, "halo": halo, "tile": 256, "batch_size": args.batch}
        cpu = predict_array(x, ref, norm, device="cpu", **kw)[0]
        gpu = predict_array(x, ref, norm, device=dev, **kw)[0]
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        fp32, _, _ = plain_loop(x, gpu_model, tile=256, halo=halo, batch=args.batch, device=dev, autocast=False)
        cpu_plain, _, _ = plain_loop(x, model, tile=256, halo=halo, batch=args.batch, device="cpu", autocast=False)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        ok = np.isfinite(cpu) & np.isfinite(gpu)
        d = np.abs(cpu[ok] - gpu[ok])
        agree = float(np.mean((cpu[ok] >= 0.5) == (gpu[ok] >= 0.5)))
        d32 = np.abs(cpu_plain - fp32)[np.isfinite(cpu_plain)]
        report["agreement"] = {
            "pixels": int(ok.sum()), "nan_masks_equal": bool(np.array_equal(np.isnan(cpu), np.isnan(gpu))),
            "bf16_autocast_vs_cpu": {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                                     "mask_agreement": agree},
            "fp32_cuda_vs_cpu_plain_loop": {"max_abs": float(d32.max()), "mean_abs": float(d32.mean())},
            "tolerance": {"mean_abs": 0.01, "mask_agreement": 0.99, "fp32_max_abs": 1e-4},
        }
        report["agreement"]["passed"] = bool(d.mean() <= 0.01 and agree >= 0.99 and d32.max() <= 1e-4
                                             and report["agreement"]["nan_masks_equal"])
        print(json.dumps({"agreement": report["agreement"]}), file=sys.stderr, flush=True)

        # 2. throughput on the same GPU
        big = synthetic_scene(args.channels, args.size, seed=2, cloud_share=0.0)
        H, W = big.shape[1:]
        runs = []
        for tile in [int(t) for t in args.tiles.split(",")]:
            tile = max(m, -(-tile // m) * m)
            work_i = icemap_work(H, W, halo, tile, m)
            n_tiles = (-(-H // tile)) * (-(-W // tile))
            work_p = (n_tiles, n_tiles * (tile + 2 * halo) ** 2)
            t_icemap = timed(lambda tile=tile: predict_array(big, ref, norm, depth=args.depth, halo=halo, tile=tile,
                                                             batch_size=args.batch, device=dev), args.repeat, cuda)
            t_bf16 = timed(lambda tile=tile: plain_loop(big, gpu_model, tile=tile, halo=halo, batch=args.batch,
                                                        device=dev, autocast=True), args.repeat, cuda)
            t_fp32 = timed(lambda tile=tile: plain_loop(big, gpu_model, tile=tile, halo=halo, batch=args.batch,
                                                        device=dev, autocast=False), args.repeat, cuda)
            entry = {"tile": tile, "halo": halo, "batch": args.batch, "pixels": H * W}
            for name, t, work in (("icemap_predict_array_bf16", t_icemap, work_i),
                                  ("plain_loop_bf16", t_bf16, work_p), ("plain_loop_fp32", t_fp32, work_p)):
                entry[name] = {"seconds": t, "tiles_per_s": work[0] / t, "useful_mpixel_per_s": H * W / 1e6 / t,
                               "network_px_per_useful_px": work[1] / (H * W)}
            entry["ratio_icemap_vs_plain_bf16"] = t_bf16 / t_icemap
            entry["ratio_icemap_vs_plain_fp32"] = t_fp32 / t_icemap
            runs.append(entry)
            print(json.dumps(entry), file=sys.stderr, flush=True)
        report["throughput"] = runs
        report["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    report["seconds"] = time.time() - started
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if report["agreement"]["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
