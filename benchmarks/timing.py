"""Device-synchronised timing shared by the benchmarks: warm-up, then the median of repeats."""

from __future__ import annotations

import json
import pathlib
import statistics
import time

import jax

# Where a benchmark writes without --out: git-ignored, so a rerun leaves no untracked files. The
# results shipped with the project sit one level up, in benchmarks/results/.
DEFAULT_OUT = pathlib.Path(__file__).parent / "results" / "local"


def report_written(*paths: pathlib.Path) -> None:
    print("wrote " + ", ".join(str(p) for p in paths), flush=True)


def write_table(stem: pathlib.Path, rows: list[dict], lines: list[str]) -> None:
    """stem.json (the rows) and stem.md (the markdown lines); prints the table and both paths."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    report_written(stem.with_suffix(".json"), stem.with_suffix(".md"))


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


def card_name(device: str) -> str:
    """What a figure calls the device of device_name(): "gpu:NVIDIA H200" -> "NVIDIA H200",
    "cpu:cpu" -> "CPU"."""
    platform, _, kind = device.partition(":")
    return "CPU" if platform == "cpu" else kind or platform


def tokens_label(n: int) -> str:
    """512 -> '512', 2048 -> '2K', 1536 -> '1.5K', 1048576 -> '1M'."""
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20}M"
    if n < 1024:
        return str(n)
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n / 1024:.1f}K"


def add_replot_arguments(parser, what: str) -> None:
    """--replot JSON... (and --name): redraw `what` from earlier runs' JSON files, merged."""
    parser.add_argument(
        "--replot",
        type=pathlib.Path,
        nargs="+",
        metavar="JSON",
        help=f"run nothing: redraw {what} of these JSON files (merged) into --out",
    )
    parser.add_argument(
        "--name", help="file name of the --replot figure (default: the first JSON's)"
    )
