"""python -m convert SRC DST: a Hugging Face safetensors folder or a GGUF file -> our format.

SRC is either an HF folder (config.json + *.safetensors) or a GGUF file (llama.cpp's format:
weights, possibly quantised, with the config and tokenizer in its metadata; architectures qwen2
and llama). DST is written in full into a temporary folder next to it and renamed into place
only when complete: a failed or interrupted (Ctrl-C, SIGTERM) conversion leaves DST as it was,
and the temporary folder of a killed one (SIGKILL) is removed by the next conversion to DST.
Bad input exits with code 2 and a one-line error; an interrupted conversion with 128 + the
signal's number and one line.

Past the native context, Qwen2.5 documents YaRN RoPE scaling; set it while converting:
    python -m convert model.gguf out/ --rope-scaling \\
        '{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'
"""

from __future__ import annotations

import argparse
import contextlib
import json
import pathlib
import signal
import sys

from convert.checkpoint import DTYPES, CheckpointError, convert_folder
from minference_jax.cli import ArgumentParser, fail
from minference_jax.models.config import ModelConfigError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so it unwinds (and cleans up) like Ctrl-C."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_as_interrupt():
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _rope_scaling(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def main(argv=None) -> int:
    parser = ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument(
        "src",
        help="Hugging Face model folder (config.json + *.safetensors) or a .gguf file; only read",
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
        "--rope-scaling",
        type=_rope_scaling,
        metavar="JSON",
        help="an HF rope_scaling object written into config.json (e.g. YaRN, see above; "
        "default: the source's own RoPE)",
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
    options = dict(
        progress=not args.quiet, overwrite=args.overwrite, rope_scaling=args.rope_scaling
    )
    try:
        with _sigterm_as_interrupt():
            src = pathlib.Path(args.src)
            if src.is_file() or src.suffix.lower() == ".gguf":
                from convert.gguf import convert_gguf

                convert_gguf(args.src, args.dst, args.dtype, **options)
            else:
                convert_folder(args.src, args.dst, args.dtype, **options)
    except (CheckpointError, ModelConfigError) as err:
        return fail(err)
    except KeyboardInterrupt as err:
        stop = signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT
        print(f"error: interrupted by {stop.name}; {args.dst} left as it was", file=sys.stderr)
        return 128 + stop
    print(f"converted {args.src} -> {args.dst} ({args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
