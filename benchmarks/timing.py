"""Honest timing helpers shared by the benchmark scripts: compile apart, medians after warm-up,
results written as soon as each row exists, FLOPs by analytic count (XLA's cost analysis misses
cuDNN convolutions on GPUs), and the reference (PyTorch/MONAI) on the same device as jaxseg."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

import jax
from absl import flags

flags.DEFINE_string("compilation_cache", "auto", "persistent XLA compilation cache: 'auto', a folder, or 'off'")
flags.DEFINE_float("peak_tflops", 0.0, "device peak TFLOP/s for MFU (0: from the device table; bf16 dense)")
flags.DEFINE_float("hbm_gbps", 0.0, "device memory bandwidth GB/s for the roofline (0: from the device table)")

# Dense bf16 matmul peak (FLOP/s) and HBM bandwidth (B/s) of the SXM parts, from NVIDIA's data sheets.
DEVICE_PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.0e12)}


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any] = block) -> float:
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def run_variants(variants: dict[str, dict], rounds: int, warmup: int,
                 call: Callable[[dict], Callable[[], Any]] = lambda v: v["fn"]) -> None:
    """Time every variant the same way: its first call (jaxseg: compilation) and ``warmup``
    calls, then ``rounds`` rounds of one call of each variant in turn (so drift hits all alike),
    each under its ``mode``: ``(dtype, cudnn_benchmark)`` for torch (``torch_mode``), None for
    jaxseg. A variant is a dict with ``sync`` and what ``call`` turns into the timed function;
    this adds ``first_call_s``, ``out`` (the first call's synced output), ``times`` and, for
    torch, ``peak_mib``."""
    for v in variants.values():
        fn = call(v)
        with _mode(v):
            if v.get("mode"):
                torch_peak_mib(reset=True)
            t0 = time.perf_counter()
            v["out"] = v["sync"](fn())
            v["first_call_s"] = time.perf_counter() - t0
            for _ in range(warmup):
                time_call(fn, v["sync"])
            if v.get("mode"):
                v["peak_mib"] = torch_peak_mib()
        v["times"] = []
    for _ in range(rounds):
        for v in variants.values():
            with _mode(v):
                v["times"].append(time_call(call(v), v["sync"]))


def _mode(v: dict):
    return torch_mode(*v["mode"]) if v.get("mode") else contextlib.nullcontext()


def paired_ratio(times: list[float], reference: list[float]) -> float:
    """Median of the per-round ratios of two variants timed in the same rounds."""
    return float(statistics.median(a / b for a, b in zip(times, reference)))


def summarize(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "p25_s": q[0], "p75_s": q[2],
            "min_s": min(times), "n": len(times)}


def setup() -> str | None:
    """Benchmarks' start: the compilation cache (as the experiments); returns its folder."""
    from jaxseg.compilation_cache import enable_compilation_cache

    path = enable_compilation_cache(flags.FLAGS.compilation_cache)
    return str(path) if path else None


def device_peaks() -> tuple[float | None, float | None]:
    """(peak FLOP/s, bandwidth B/s) of jax's first device: flags first, then the table."""
    kind = getattr(jax.devices()[0], "device_kind", "")
    peak, bw = next((v for k, v in DEVICE_PEAKS.items() if k in kind), (None, None))
    f = flags.FLAGS
    return (f.peak_tflops * 1e12 if f.peak_tflops else peak), (f.hbm_gbps * 1e9 if f.hbm_gbps else bw)


def efficiency(flops: float, bytes_: float, seconds: float) -> dict[str, float]:
    """TFLOP/s from the analytic count, and on a device with known peaks: MFU, the roofline time
    (max of FLOPs at peak and bytes at HBM bandwidth) and the fraction of it achieved."""
    out = {"flops": flops, "bytes": bytes_, "tflops_per_s": flops / seconds / 1e12}
    peak, bw = device_peaks()
    if peak and jax.default_backend() != "cpu":
        roof = max(flops / peak, bytes_ / bw)
        out.update(mfu=flops / seconds / peak, roofline_s=roof, roofline_fraction=roof / seconds)
    return out


def jax_peak_mib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**20 if "peak_bytes_in_use" in stats else None


def machine() -> dict[str, Any]:
    dev = jax.devices()[0]
    out = {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
           "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
           "date": time.strftime("%Y-%m-%d"),
           "compilation_cache": jax.config.jax_compilation_cache_dir or None}
    with contextlib.suppress(ImportError):
        import torch

        out["torch"] = torch.__version__
        if torch.cuda.is_available():
            out["torch_device"] = torch.cuda.get_device_name(0)
    return out


class Results:
    """A results JSON rewritten after every row, so a benchmark cut short by a timeout still
    leaves what it measured."""

    def __init__(self, path: str | None, **header: Any):
        self.path, self.payload = path, {"machine": machine(), **header, "rows": []}
        self.write()

    def add(self, row: dict) -> dict:
        self.payload["rows"].append(row)
        self.write()
        return row

    def write(self) -> None:
        write_json(self.path, self.payload)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2, default=float)
        os.replace(tmp, path)


# ---- PyTorch/MONAI reference on the same device ----

def torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_sync(x: Any = None) -> Any:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return x


def torch_modes(dtypes: list[str]) -> list[tuple[str, bool]]:
    """(dtype, cudnn.benchmark) pairs to time: bf16 runs under ``torch.autocast``; on CUDA both
    cudnn.benchmark settings (MONAI leaves it off; on lets cuDNN pick its fastest algorithm)."""
    import torch

    benches = (False, True) if torch.cuda.is_available() else (False,)
    return [(d, b) for d in dtypes for b in benches]


@contextlib.contextmanager
def torch_mode(dtype: str, cudnn_benchmark: bool):
    import torch

    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        if dtype == "bfloat16":
            with torch.autocast(torch_device(), dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cudnn.benchmark = old


def torch_peak_mib(reset: bool = False) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    if reset:
        torch.cuda.reset_peak_memory_stats()
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def monai_unetr(model: Any, device: str):
    """MONAI's UNETR with ``model``'s sizes (MONAI fixes 12 layers and patch 16)."""
    import torch
    from monai.networks.nets import UNETR

    if model.num_layers != 12 or model.patch_size != 16:
        raise ValueError("MONAI's UNETR has 12 layers and patch 16: build the jaxseg model with those")
    torch.manual_seed(0)
    return UNETR(model.in_channels, model.out_channels, model.img_size, model.feature_size, model.hidden_size,
                 model.mlp_dim, model.num_heads).to(device)
