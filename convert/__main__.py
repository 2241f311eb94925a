"""python -m convert SRC DST [--dtype bfloat16|float16|float32]: HF folder -> our format."""

from __future__ import annotations

import argparse
import sys

from convert.checkpoint import DTYPES, CheckpointError, convert_folder
from minference_jax.models.config import ModelConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument("src", help="Hugging Face model folder (config.json + *.safetensors)")
    parser.add_argument("dst", help="output folder (created)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        convert_folder(args.src, args.dst, args.dtype, progress=not args.quiet)
    except (CheckpointError, ModelConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {args.dst} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
