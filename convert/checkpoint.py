"""HF folders <-> our converted format, written safely.

Loading (`load_model`, `load_hf`, the converted-format checks) lives with the models in
`minference_jax.models.checkpoint`; its names are re-exported here. This module writes:
`convert_folder` (the `python -m convert` job) and `export_hf` (our model back to an HF folder).

A conversion never leaves a half-written or mixed destination: it is written into a hidden
temporary sibling of DST and renamed into place only once complete. DST must be absent or an
empty folder; with `overwrite=True` an existing DST is replaced as a whole, its old content moved
aside and removed only after the new folder is in place. A conversion that was killed (SIGKILL,
power loss) leaves its temporary folder behind; the next conversion to the same DST removes it,
once the folder's lock says its owner is gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import secrets
import shutil
import warnings
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from safetensors.numpy import save_file

from minference_jax.models import hf_tables as tables
from minference_jax.models.checkpoint import (
    CONVERTED_FORMAT,
    DTYPES,
    META_FILE,
    PARAMS_FILE,
    CheckpointError,
    converted_metadata,
    expected_shapes,
    flat_params,
    is_converted,
    load_converted,
    load_hf,
    load_model,
    model_from_params,
    read_hf_params,
    weight_files,
)
from minference_jax.models.config import ModelConfig, read_hf_config
from minference_jax.models.modeling import CausalLM

__all__ = [
    "CONVERTED_FORMAT",
    "DTYPES",
    "CheckpointError",
    "convert_folder",
    "expected_shapes",
    "export_hf",
    "flat_params",
    "is_converted",
    "load_converted",
    "load_hf",
    "load_model",
    "model_from_params",
    "read_hf_params",
    "save_converted",
    "weight_files",
]
# Side files of an HF folder copied next to the converted weights.
EXTRA_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)
# In a staging folder while it is being written: the writer's pid, under a lock it holds until
# the folder is renamed into place or removed. The kernel drops the lock when the writer dies,
# however it dies, so a free lock marks a stale folder (pid reuse cannot fool it).
OWNER_FILE = ".owner"


def save_converted(params: dict[str, np.ndarray], hf_config: dict, dst, dtype_name: str) -> None:
    """Write a converted folder's files into the existing folder `dst` (no safety net: see
    `convert_folder`)."""
    dst = pathlib.Path(dst)
    meta = converted_metadata(params, dtype_name)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=1))
    _save_tensors({k: np.asarray(v) for k, v in params.items()}, dst / PARAMS_FILE)
    (dst / META_FILE).write_text(json.dumps(meta, indent=1))


def _save_tensors(tensors: dict[str, np.ndarray], path, metadata: dict | None = None) -> None:
    """`safetensors` save_file, leaving the file with the mode any new file gets (0644 under
    umask 022): safetensors writes through a private (0600) temporary file."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0o077)  # it can only be read by setting it; meanwhile new files are private
    os.umask(mask)
    return mask


def check_destination(src, dst, *, overwrite: bool = False) -> None:
    """Refuse a destination that would lose or mix data, before any work is done."""
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_src == real_dst:
        raise CheckpointError(f"source and destination are the same folder: {src}")
    if real_dst.is_relative_to(real_src):
        raise CheckpointError(f"destination {dst} lies inside the source folder {src}")
    if real_src.is_relative_to(real_dst):
        raise CheckpointError(f"the source {src} lies inside the destination folder {dst}")
    if dst.is_symlink():
        raise CheckpointError(f"destination {dst} is a symbolic link; give the real folder")
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise CheckpointError(
            f"destination {dst} is not empty; choose a new folder, or pass --overwrite to "
            "replace it as a whole"
        )
    parent = _existing_ancestor(real_dst.parent)
    if not parent.is_dir():
        raise CheckpointError(f"cannot create {dst}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CheckpointError(f"cannot write to {parent} (permission denied)")


def _existing_ancestor(path: pathlib.Path) -> pathlib.Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def convert_folder(
    src,
    dst,
    dtype_name: str = "bfloat16",
    *,
    progress: bool = True,
    overwrite: bool = False,
    rope_scaling: dict | None = None,
) -> None:
    """HF folder -> converted folder (the `python -m convert` job).

    DST must be absent or empty unless `overwrite`, which replaces it as a whole, and only once
    the new conversion is complete. A failure at any point leaves DST exactly as it was.
    `rope_scaling` (an HF `rope_scaling` dict, e.g. Qwen2.5's YaRN) replaces config.json's.
    """
    if dtype_name not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype_name!r}; choose from {', '.join(DTYPES)}")
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {src}")
    check_destination(src, dst, overwrite=overwrite)
    hf_config = read_hf_config(src)
    if rope_scaling is not None:
        hf_config = with_rope_scaling(hf_config, rope_scaling)
    config = ModelConfig.from_hf_dict(hf_config)
    params = read_hf_params(src, config, DTYPES[dtype_name], progress=progress)

    def write(staging: pathlib.Path) -> None:
        save_converted(params, hf_config, staging, dtype_name)
        for extra in EXTRA_FILES:
            if (src / extra).is_file():
                shutil.copyfile(src / extra, staging / extra)  # a new file's mode, not SRC's

    write_atomically(dst, write, overwrite=overwrite)


def with_rope_scaling(hf_config: dict, rope_scaling: dict) -> dict:
    """config.json with HF's `rope_scaling` set; for YaRN, `max_position_embeddings` becomes the
    extended context (factor x original), which transformers reads YaRN's factor from."""
    if not isinstance(rope_scaling, dict):
        raise CheckpointError(
            "--rope-scaling must be a JSON object, e.g. "
            '\'{"type": "yarn", "factor": 4.0, '
            '"original_max_position_embeddings": 32768}\''
        )
    out = {**hf_config, "rope_scaling": dict(rope_scaling)}
    replaced = out.pop("rope_parameters", None) or {}  # transformers 5 form; keep its theta
    if "rope_theta" in replaced:
        out.setdefault("rope_theta", replaced["rope_theta"])
    kind = rope_scaling.get("rope_type") or rope_scaling.get("type")
    original = rope_scaling.get("original_max_position_embeddings")
    factor = rope_scaling.get("factor")
    if kind == "yarn" and isinstance(original, int) and isinstance(factor, int | float):
        out["max_position_embeddings"] = int(round(original * factor))
    return out


def write_atomically(dst, write: Callable[[pathlib.Path], None], *, overwrite: bool) -> None:
    """Run `write(folder)` into a hidden sibling of `dst`, then rename it into place: a failure
    at any point leaves `dst` as it was (`check_destination` first). Staging folders of `dst`
    left by killed conversions are removed first; those of live ones are left alone."""
    dst = pathlib.Path(os.path.abspath(dst))  # "out/", "." or "a/../out": a real name and parent
    staging = _sibling(dst, "converting")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_staging(dst)
        staging.mkdir()
    except OSError as err:
        raise CheckpointError(f"cannot create {dst}: {err}") from err
    owner = None
    try:
        owner = _claim(staging)
        write(staging)
        os.unlink(staging / OWNER_FILE)  # still locked through `owner` until the rename is done
        _move_into_place(staging, dst, overwrite=overwrite)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointError(f"writing {dst} failed, {dst} left unchanged: {err}") from err
        raise
    finally:
        if owner is not None:
            os.close(owner)


def _claim(staging: pathlib.Path) -> int:
    """Lock `staging`'s owner file and write our pid into it; the descriptor holds the lock."""
    fd = os.open(staging / OWNER_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        # Blocking: a concurrent cleaner may hold it for a moment, and skips it while empty.
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:
        pass  # a file system without locks: the folder is just never taken for stale
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _remove_stale_staging(dst: pathlib.Path) -> None:
    """Remove the staging folders of `dst` (absolute) whose conversion was killed."""
    pattern = re.compile(re.escape(f".{dst.name}.converting-") + "[0-9a-f]{12}")
    for folder in dst.parent.iterdir():
        if pattern.fullmatch(folder.name) and _owner_is_gone(folder):
            shutil.rmtree(folder, ignore_errors=True)


def _owner_is_gone(folder: pathlib.Path) -> bool:
    """The owner file holds a pid (written once locked) and its lock is free. No owner file: a
    conversion being set up or finishing (or not ours), never touched. A writer that finished
    between our open and lock has renamed the folder away, so removing the name is then a no-op.
    """
    try:
        fd = os.open(folder / OWNER_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return os.read(fd, 32).strip().isdigit()
    except OSError:  # held by a live conversion, or no locks on this file system
        return False
    finally:
        os.close(fd)


def _move_into_place(staging: pathlib.Path, dst: pathlib.Path, *, overwrite: bool) -> None:
    """Rename the complete `staging` folder to `dst`; an old `dst` goes only once that worked."""
    if not (overwrite and dst.exists()):
        os.rename(staging, dst)  # onto an absent or empty folder only (ENOTEMPTY otherwise)
        return
    aside = _sibling(dst, "replaced")
    os.rename(dst, aside)
    try:
        os.rename(staging, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    try:
        shutil.rmtree(aside)
    except OSError as err:
        warnings.warn(
            f"converted {dst}, but could not remove its old content at {aside}: {err}", stacklevel=2
        )


def _sibling(dst: pathlib.Path, role: str) -> pathlib.Path:
    """A hidden, unused name next to `dst` (same file system, so renames are atomic)."""
    return dst.parent / f".{dst.name}.{role}-{secrets.token_hex(6)}"


def export_hf(model: CausalLM, hf_config: dict, dst) -> None:
    """Write our model back as an HF folder (config.json + model.safetensors)."""
    config = model.config
    ours = {
        k: np.asarray(jnp.asarray(v, jnp.float32) if v.dtype == jnp.bfloat16 else v)
        for k, v in flat_params(model).items()
    }
    if model.dtype == jnp.bfloat16:
        ours = {k: v.astype(jnp.bfloat16) for k, v in ours.items()}
    out = {}
    for rule in tables.RULES[config.family]:
        layers = range(config.num_layers) if r"(\d+)" in rule.hf else [None]
        for layer in layers:
            targets = [p.format(layer=layer) for p in rule.ours]
            if not all(t in ours for t in targets):
                continue  # e.g. biases of a model without them, lm_head when tied
            name = re.sub(r"\\(.)", r"\1", rule.hf.replace(r"(\d+)", str(layer)))
            out[name] = np.ascontiguousarray(rule.join(tuple(ours[t] for t in targets), config))
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=1))
    _save_tensors(out, dst / "model.safetensors", metadata={"format": "pt"})
