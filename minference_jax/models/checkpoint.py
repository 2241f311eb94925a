"""Checkpoint folders -> Flax NNX models: our converted format, or an HF folder on the fly.

Formats
- HF folder: `config.json` + `model.safetensors`, or shards listed in
  `model.safetensors.index.json`. Pickled `.bin`/`.pt` weights are refused, never loaded.
  Tensor names map onto our parameters through `minference_jax.models.hf_tables`.
- Converted folder (written by `python -m convert`): `config.json` (the HF config, verbatim),
  `params.safetensors` (one tensor per parameter path, e.g. `layers.3.attn.q_proj.kernel`,
  kernels [in, out]) and `minference_jax.json`:
  `{"format": "minference_jax.params", "version": 2, "dtype": ..., "tensors": {path:
  {"shape": [...], "sha256": ...}}}`. Loading checks every parameter's presence and shape against
  config.json, and every stored tensor against the shape and SHA-256 the writer recorded.
  Version 1 folders (no "tensors") still load, with the config checks only.

Tensors are read one at a time (safetensors memory-maps the file), transformed, cast and kept:
loading an 8B checkpoint holds one copy of the weights plus one tensor.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from minference_jax.models import hf_tables as tables
from minference_jax.models.config import ModelConfig
from minference_jax.models.modeling import CausalLM

CONVERTED_FORMAT = {"format": "minference_jax.params", "version": 2}
READABLE_VERSIONS = (1, 2)  # version 1: no per-tensor shapes and checksums
META_FILE = "minference_jax.json"
PARAMS_FILE = "params.safetensors"
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}
# safetensors header dtype -> our dtype name.
_STORED_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint folder is missing pieces, corrupt, or does not match its config."""


def weight_files(folder: str | os.PathLike) -> list[pathlib.Path]:
    """The safetensors files of an HF folder, shards checked against their index."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err!r}") from err
        if not isinstance(weight_map, dict) or not all(
            isinstance(s, str) for s in weight_map.values()
        ):
            raise CheckpointError(
                f"{index}: weight_map must be an object of tensor name -> shard file name"
            )
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise CheckpointError(f"missing shard(s) listed in {index.name}: {', '.join(missing)}")
        return [folder / s for s in shards]
    files = sorted(folder.glob("model*.safetensors"))  # model.safetensors or model-0000k-of-n
    if files:
        return files
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
    if pickles:
        raise CheckpointError(
            f"{folder} has only pickle weights ({', '.join(pickles)}); they are never loaded here "
            "(unsafe, and they need torch). Save the model as safetensors first, e.g. "
            "`model.save_pretrained(dst, safe_serialization=True)` in transformers."
        )
    raise CheckpointError(f"no *.safetensors weights in {folder}")


def _open(path: pathlib.Path):
    try:
        return safe_open(str(path), framework="np")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {path} (corrupt safetensors header?): {err}") from err


def _get_tensor(f, name: str, path: pathlib.Path) -> np.ndarray:
    try:
        return f.get_tensor(name)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"cannot read tensor {name} from {path}: {err}") from err


def _listing(names, limit: int = 8) -> str:
    names = list(names)
    return ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")


def _mismatch(folder, what: str, problems: list[str]) -> CheckpointError:
    return CheckpointError(f"{folder} does not match {what}: " + "; ".join(problems))


def expected_shapes(config: ModelConfig, dtype=jnp.float32) -> dict[str, tuple[int, ...]]:
    """Parameter path -> shape of the model this config describes (no allocation)."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype))
    return {path: tuple(v.shape) for path, v in flat_params(abstract).items()}


def flat_params(model: CausalLM) -> dict[str, jax.Array]:
    """Parameter path ("layers.0.attn.q_proj.kernel") -> array."""
    state = nnx.state(model, nnx.Param)
    return {
        ".".join(str(k) for k in path): leaf.get_raw_value()
        for path, leaf in nnx.to_flat_state(state)
    }


def tensor_sha256(array: np.ndarray) -> str:
    """SHA-256 of a tensor's bytes (C order), as recorded in `minference_jax.json`."""
    return hashlib.sha256(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).hexdigest()


def converted_metadata(params: dict[str, np.ndarray], dtype_name: str) -> dict:
    """The `minference_jax.json` of a converted folder holding `params` (the writer's record)."""
    if dtype_name not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype_name!r}; choose from {', '.join(DTYPES)}")
    tensors = {
        name: {"shape": list(np.shape(value)), "sha256": tensor_sha256(np.asarray(value))}
        for name, value in sorted(params.items())
    }
    return {**CONVERTED_FORMAT, "dtype": dtype_name, "tensors": tensors}


def read_hf_params(
    folder, config: ModelConfig, dtype, *, progress: bool = True
) -> dict[str, np.ndarray]:
    """Read, map and cast every tensor of an HF folder; all errors are reported together."""
    files = weight_files(folder)
    names, seen = [], {}
    for path in files:
        with _open(path) as f:
            for name in f.keys():
                if name in seen:  # without an index nothing says which copy is meant
                    raise CheckpointError(
                        f"tensor {name} is stored twice, in {seen[name].name} and {path.name}"
                    )
                seen[name] = path
                names.append((path, name))
    check_layer_count((n for _, n in names), config, folder)

    def read(path, name):
        with _open(path) as f:
            return _get_tensor(f, name, path)

    tensors = ((name, functools.partial(read, path, name)) for path, name in names)
    return map_hf_tensors(
        tensors, config, dtype, source=folder, total=len(names), progress=progress
    )


def map_hf_tensors(
    tensors: Iterable[tuple[str, Callable[[], np.ndarray]]],
    config: ModelConfig,
    dtype,
    *,
    source,
    against: str = "its config.json",
    total: int | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """HF-named tensors -> our parameters, through the family's table, cast to `dtype`.

    `tensors` yields (HF name, a function reading that tensor): each tensor is read only when
    its turn comes, so one copy of the weights plus one tensor is held. Every missing,
    unexpected or misshapen tensor is reported together, naming `source` and what it was
    checked `against`.
    """
    np_dtype = jnp.dtype(dtype)
    expected = expected_shapes(config)
    params, problems, unexpected = {}, [], []
    for name, read in tqdm(
        tensors, desc="convert", unit="tensor", total=total, disable=not progress
    ):
        if any(p.fullmatch(name) for p in tables.IGNORED):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        found = tables.match(name, config.family)
        if found is None:
            unexpected.append(name)
            continue
        rule, targets = found
        tensor = read()
        if not jnp.issubdtype(tensor.dtype, jnp.floating):
            problems.append(
                f"{name}: stored as {tensor.dtype}; weights must be floating point (a header "
                "declaring the wrong dtype?)"
            )
            continue
        try:
            pieces = rule.split(tensor, config)
        except ValueError as err:
            problems.append(f"{name}: {err}")
            continue
        for target, piece in zip(targets, pieces, strict=True):
            if target not in expected:
                unexpected.append(f"{name} -> {target}")
            elif tuple(piece.shape) != expected[target]:
                problems.append(
                    f"{name}: shape {tuple(tensor.shape)} gives {target} {tuple(piece.shape)}, "
                    f"config expects {expected[target]}"
                )
            else:
                with np.errstate(over="ignore"):  # an overflow is reported just below
                    params[target] = np.ascontiguousarray(piece.astype(np_dtype))
                bad = np.size(params[target]) - np.count_nonzero(np.isfinite(params[target]))
                if bad:  # NaN stored, or a value beyond the target dtype's range
                    problems.append(
                        f"{name}: {bad} non-finite value(s) (NaN or inf) as {np_dtype.name}"
                    )
    missing = sorted(set(expected) - set(params))
    if missing:
        problems.append(f"missing tensors for: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    if problems:
        raise _mismatch(source, against, problems)
    return params


_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_layer_count(names: Iterable[str], config: ModelConfig, source) -> None:
    """Refuse at once a config whose num_hidden_layers disagrees with the stored tensors.

    Runs before anything is built from the config, so a wrong count (e.g. 100000 for a 2-layer
    checkpoint) is reported in milliseconds instead of building a huge abstract model first.
    """
    indices = {int(m.group(1)) for n in names if (m := _LAYER_INDEX.search(n))}
    if indices and max(indices) + 1 != config.num_layers:
        raise CheckpointError(
            f"{source}: config.json says num_hidden_layers={config.num_layers}, the stored "
            f"tensors hold {max(indices) + 1} layers"
        )


def model_from_params(config: ModelConfig, params: dict, dtype) -> CausalLM:
    """Fill an abstract (never allocated) model with the given arrays, checking every shape."""
    abstract = nnx.eval_shape(lambda: CausalLM(config, dtype=dtype))
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    leaves = []
    for path, leaf in flat:
        key = ".".join(str(k) for k in path)
        if key not in params:
            raise CheckpointError(f"no value for parameter {key}")
        value = jnp.asarray(params[key], dtype)
        if value.shape != leaf.shape:
            raise CheckpointError(f"{key}: shape {value.shape}, model expects {leaf.shape}")
        leaves.append((path, leaf.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def load_hf(folder, dtype=jnp.float32, *, progress: bool = False) -> tuple[CausalLM, ModelConfig]:
    """An HF folder converted in memory (nothing written)."""
    config = ModelConfig.from_hf_folder(folder)
    return model_from_params(
        config, read_hf_params(folder, config, dtype, progress=progress), dtype
    ), config


def is_converted(folder) -> bool:
    return (pathlib.Path(folder) / META_FILE).is_file()


def read_converted_metadata(folder) -> dict:
    """`minference_jax.json`, validated: format, readable version, known dtype, tensor records."""
    path = pathlib.Path(folder) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not readable JSON (corrupt?): {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    if meta.get("format") != CONVERTED_FORMAT["format"]:
        raise CheckpointError(f"{path}: unknown format {meta.get('format')!r}")
    version = meta.get("version")
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"{path}: unsupported version {version!r} (this release reads "
            f"{', '.join(map(str, READABLE_VERSIONS))}); convert the checkpoint again"
        )
    if meta.get("dtype") not in DTYPES:
        raise CheckpointError(
            f"{path}: unknown dtype {meta.get('dtype')!r}; expected one of {', '.join(DTYPES)}"
        )
    if version >= 2:
        tensors = meta.get("tensors")
        if not isinstance(tensors, dict) or not all(
            _valid_record(record) for record in tensors.values()
        ):
            raise CheckpointError(
                f'{path}: "tensors" must map each parameter to {{"shape": [int, ...], '
                '"sha256": 64 hex digits}'
            )
    return meta


def _valid_record(record) -> bool:
    return (
        isinstance(record, dict)
        and isinstance(record.get("shape"), list)
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in record["shape"])
        and isinstance(record.get("sha256"), str)
        and _SHA256.fullmatch(record["sha256"]) is not None
    )


def _check_stored(f, expected: dict[str, tuple[int, ...]], meta: dict) -> list[str]:
    """Problems of the stored tensors' names, shapes and dtypes vs config and writer's record."""
    stored = {}
    for name in f.keys():
        view = f.get_slice(name)
        stored[name] = (tuple(view.get_shape()), _STORED_DTYPES.get(view.get_dtype()))
    problems = []
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    if missing:
        problems.append(f"missing tensors for: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {_listing(unexpected)}")
    for name in sorted(set(expected) & set(stored)):
        if stored[name][0] != expected[name]:
            problems.append(f"{name}: shape {stored[name][0]}, config expects {expected[name]}")
        if stored[name][1] != meta["dtype"]:
            problems.append(
                f"{name}: stored as {stored[name][1]}, {META_FILE} says {meta['dtype']}"
            )
    records = meta.get("tensors")
    if records is not None:
        if set(records) != set(stored):
            problems.append(
                f"tensors differ from those {META_FILE} records: "
                f"{_listing(sorted(set(records) ^ set(stored)))}"
            )
        for name in sorted(set(records) & set(stored)):
            if tuple(records[name]["shape"]) != stored[name][0]:
                problems.append(
                    f"{name}: shape {stored[name][0]}, {META_FILE} records "
                    f"{tuple(records[name]['shape'])}"
                )
    return problems


def load_converted(
    folder, dtype=None, *, verify_checksums: bool = True
) -> tuple[CausalLM, ModelConfig]:
    """A converted folder (dtype default: as stored), every tensor checked before use.

    `verify_checksums=False` skips hashing the tensors (about 1 s per GB); names, shapes and
    dtypes are always checked.
    """
    folder = pathlib.Path(folder)
    meta = read_converted_metadata(folder)
    config = ModelConfig.from_hf_folder(folder)
    path = folder / PARAMS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has {META_FILE} but no {PARAMS_FILE}")
    params = {}
    with _open(path) as f:
        check_layer_count(f.keys(), config, folder)
        problems = _check_stored(f, expected_shapes(config), meta)
        if problems:
            raise _mismatch(folder, f"its config.json and {META_FILE}", problems)
        records = meta.get("tensors")
        for name in f.keys():
            params[name] = _get_tensor(f, name, path)
            if (
                verify_checksums
                and records is not None
                and tensor_sha256(params[name]) != records[name]["sha256"]
            ):
                raise CheckpointError(
                    f"{path}: tensor {name} does not match its SHA-256 in {META_FILE} "
                    "(corrupt or replaced file); convert the checkpoint again"
                )
    return model_from_params(config, params, dtype or DTYPES[meta["dtype"]]), config


def load_model(
    folder, dtype=None, *, progress: bool = False, verify_checksums: bool = True
) -> tuple[CausalLM, ModelConfig]:
    """A converted folder, or an HF folder converted on the fly (dtype default: as stored).

    `verify_checksums`: see `load_converted` (HF folders carry no checksums).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {folder}")
    if is_converted(folder):
        return load_converted(folder, dtype, verify_checksums=verify_checksums)
    return load_hf(folder, dtype or jnp.float32, progress=progress)
