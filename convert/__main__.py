"""python -m convert SRC DST: a Hugging Face safetensors folder -> our converted format.

DST is written in full into a temporary folder next to it and renamed into place only when
complete: a failed or interrupted conversion leaves DST as it was. Bad input exits with code 2
and a one-line error.
"""

from __future__ import annotations

import argparse
import sys

from convert.checkpoint import DTYPES, CheckpointError, convert_folder
from minference_jax.models.config import ModelConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "src", help="Hugging Face model folder (config.json + *.safetensors); only read"
    )
    parser.add_argument(
        "dst",
        help="output folder; must not exist or be empty (see --overwrite), and must not be "
        "SRC, inside SRC, or hold SRC",
    )
    parser.add_argument(
        "--dtype",
        default="bfloat16",
        choices=sorted(DTYPES),
        help="dtype the weights are stored in (default: %(default)s)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty DST as a whole (every old file goes), only after the new "
        "conversion is complete (default: off, a non-empty DST is refused)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar (default: show it on stderr)"
    )
    args = parser.parse_args(argv)
    try:
        convert_folder(
            args.src, args.dst, args.dtype, progress=not args.quiet, overwrite=args.overwrite
        )
    except (CheckpointError, ModelConfigError) as err:
        print("error: " + " ".join(str(err).split()), file=sys.stderr)  # one line
        return 2
    print(f"converted {args.src} -> {args.dst} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
