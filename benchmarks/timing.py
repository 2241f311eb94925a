"""Device-synchronised timing shared by the benchmarks: warm-up, then the median of repeats."""

from __future__ import annotations

import statistics
import time

import jax


def time_fn(fn, *args, warmup: int = 2, repeats: int = 10) -> float:
    """Median wall time in ms of fn(*args), blocking on the result each call."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_name() -> str:
    device = jax.devices()[0]
    return f"{device.platform}:{getattr(device, 'device_kind', device.platform)}"
