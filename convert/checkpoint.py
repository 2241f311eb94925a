"""HF checkpoint folders <-> our parameters <-> Flax NNX models.

Formats
- HF folder: `config.json` + `model.safetensors`, or shards listed in
  `model.safetensors.index.json`. Pickled `.bin`/`.pt` weights are refused, never loaded.
- Converted folder (ours): `config.json` (the HF config, verbatim), `params.safetensors` (one
  tensor per parameter path, e.g. `layers.3.attn.q_proj.kernel`, kernels [in, out]) and
  `minference_jax.json` (`{"format": "minference_jax.params", "version": 1, "dtype": ...}`).

Tensors are read one at a time (safetensors memory-maps the file), transformed, cast and kept:
converting an 8B checkpoint holds one copy of the weights plus one tensor.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from convert import tables
from minference_jax.models.config import ModelConfig, read_hf_config
from minference_jax.models.modeling import CausalLM

CONVERTED_FORMAT = {"format": "minference_jax.params", "version": 1}
DTYPES = {"bfloat16": jnp.bfloat16, "float16": jnp.float16, "float32": jnp.float32}


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
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index} is not a valid safetensors index: {err}") from err
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


def read_hf_params(
    folder, config: ModelConfig, dtype, *, progress: bool = True
) -> dict[str, np.ndarray]:
    """Read, map and cast every tensor of an HF folder; all errors are reported together."""
    np_dtype = jnp.dtype(dtype)
    expected = expected_shapes(config)
    params, problems, unexpected = {}, [], []
    files = weight_files(folder)
    names = []
    for path in files:
        with _open(path) as f:
            names += [(path, n) for n in f.keys()]
    for path, name in tqdm(names, desc="convert", unit="tensor", disable=not progress):
        if any(p.fullmatch(name) for p in tables.IGNORED):
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        found = tables.match(name, config.family)
        if found is None:
            unexpected.append(name)
            continue
        rule, targets = found
        with _open(path) as f:
            try:
                tensor = f.get_tensor(name)
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"cannot read tensor {name} from {path}: {err}") from err
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
                params[target] = np.ascontiguousarray(piece.astype(np_dtype))
    missing = sorted(set(expected) - set(params))
    if missing:
        problems.append(
            f"missing tensors for: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected tensors: {', '.join(unexpected[:8])}"
            + (" ..." if len(unexpected) > 8 else "")
        )
    if problems:
        raise CheckpointError(
            f"{folder} does not match its config.json:\n  " + "\n  ".join(problems)
        )
    return params


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
    config = ModelConfig.from_hf_folder(folder)
    return model_from_params(
        config, read_hf_params(folder, config, dtype, progress=progress), dtype
    ), config


def save_converted(params: dict[str, np.ndarray], hf_config: dict, dst, dtype_name: str) -> None:
    dst = pathlib.Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=1))
    save_file({k: np.asarray(v) for k, v in params.items()}, str(dst / "params.safetensors"))
    (dst / "minference_jax.json").write_text(json.dumps({**CONVERTED_FORMAT, "dtype": dtype_name}))


def convert_folder(src, dst, dtype_name: str = "bfloat16", *, progress: bool = True) -> None:
    """HF folder -> converted folder (the `python -m convert` job)."""
    if dtype_name not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype_name!r}; choose from {', '.join(DTYPES)}")
    hf_config = read_hf_config(src)
    config = ModelConfig.from_hf_dict(hf_config)
    params = read_hf_params(src, config, DTYPES[dtype_name], progress=progress)
    save_converted(params, hf_config, dst, dtype_name)
    for extra in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        if (pathlib.Path(src) / extra).is_file():
            shutil.copy(pathlib.Path(src) / extra, pathlib.Path(dst) / extra)


def is_converted(folder) -> bool:
    return (pathlib.Path(folder) / "minference_jax.json").is_file()


def load_model(folder, dtype=None, *, progress: bool = False) -> tuple[CausalLM, ModelConfig]:
    """A converted folder, or an HF folder converted on the fly (dtype default: as stored)."""
    folder = pathlib.Path(folder)
    if not is_converted(folder):
        return load_hf(folder, dtype or jnp.float32, progress=progress)
    meta = json.loads((folder / "minference_jax.json").read_text())
    if meta.get("format") != CONVERTED_FORMAT["format"]:
        raise CheckpointError(
            f"{folder}/minference_jax.json: unknown format {meta.get('format')!r}"
        )
    dtype = dtype or DTYPES[meta["dtype"]]
    config = ModelConfig.from_hf_folder(folder)
    params = {}
    with _open(folder / "params.safetensors") as f:
        for key in f.keys():
            params[key] = f.get_tensor(key)
    return model_from_params(config, params, dtype), config


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
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
