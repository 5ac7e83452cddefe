"""Honest timing helpers shared by the benchmark scripts: compile apart, medians after warm-up."""

from __future__ import annotations

import json
import platform
import statistics
import time
from typing import Any, Callable

import jax


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def time_call(fn: Callable[[], Any], sync: Callable[[Any], Any] = block) -> float:
    t0 = time.perf_counter()
    sync(fn())
    return time.perf_counter() - t0


def summarize(times: list[float]) -> dict[str, float]:
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_s": statistics.median(times), "p25_s": q[0], "p75_s": q[2],
            "min_s": min(times), "n": len(times)}


def machine() -> dict[str, Any]:
    import os

    dev = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": getattr(dev, "device_kind", str(dev)),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
