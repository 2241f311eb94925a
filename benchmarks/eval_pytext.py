"""pytext-12m on one GPU: NIAH over held-out real text and held-out bits/byte, 2K-32K tokens.

    PYTHONUNBUFFERED=1 python -m benchmarks.eval_pytext --out $OUT \\
        --adaptive SPEC [SPEC ...]            # extra pattern specs, as the search reads them

Runs `benchmarks.niah` on minference_jax/checkpoints/pytext-12m in bfloat16 (dense = cuDNN,
sparse = the Pallas kernel, forced at every length) for the modes dense, its shipped searched
config (minference), uniform VerticalSlash(1000, 6096), uniform A-shape(64, 1024) and every
--adaptive spec; 5 needle depths x --samples prompts per length in one batch, and as many
held-out windows for bits/byte. Lengths run shortest-first except 32K, third, so a run cut
short by --deadline still has 2K, 8K and 32K. Writes to --out: niah_<device>.{json,md,png} and
eval_pytext.log (this output), then prints the summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import sys
import time

from benchmarks import niah
from benchmarks.device_guard import declare
from benchmarks.timing import DEFAULT_OUT

MODEL = pathlib.Path(__file__).parents[1] / "minference_jax" / "checkpoints" / "pytext-12m"
LENGTHS = (2048, 8192, 32768, 4096, 16384)
MODES = ("dense", "minference", "vs:1000,6096", "ashape:64,1024")


class Tee(io.TextIOBase):
    """Write to the console and a log file at once."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text):
        for stream in self.streams:
            stream.write(text)
            stream.flush()
        return len(text)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--adaptive", nargs="*", default=[], help="extra mode specs")
    parser.add_argument("--samples", type=int, default=8, help="prompts per length and depth")
    parser.add_argument("--lengths", type=int, nargs="+", default=list(LENGTHS), help="tokens")
    parser.add_argument(
        "--deadline", type=float, default=240, help="seconds: start no new length after this"
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    declare(parser, "eval_pytext")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with (
        open(args.out / "eval_pytext.log", "w") as log,
        contextlib.redirect_stdout(Tee(sys.stdout, log)),
    ):
        rows = niah.main(
            [
                "--model",
                str(MODEL),
                "--dtype",
                args.dtype,
                "--haystack",
                "heldout",
                "--samples",
                str(args.samples),
                "--lengths",
                *map(str, args.lengths),
                "--modes",
                *MODES,
                *args.adaptive,
                "--deadline",
                str(args.deadline),
                "--out",
                str(args.out),
                *(["--allow-cpu"] if args.allow_cpu else []),
            ]
        )
        print(f"total {time.perf_counter() - start:.0f} s")
        report = next(args.out.glob("niah_*.md")).read_text().split("\n\nAccuracy by depth")[0]
        print(report)
    return rows


if __name__ == "__main__":
    main()
