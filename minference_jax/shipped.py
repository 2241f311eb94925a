"""What ships inside the package, addressable by name from any folder.

`--pattern-config` and `--model` (and `minference_jax.load`) take a path or a shipped name:
- a path that exists always wins;
- else a bare name: a pattern config's file stem in `minference_jax/configs/` (with or without
  `.json`), or a checkpoint folder in `minference_jax/checkpoints/`;
- else a repository path such as `minference_jax/configs/NAME.json`, as the docs write them,
  read as NAME (so the docs' commands also work from outside a source checkout).

`match_pattern_config` picks the shipped config made for a model: by the model name its
checkpoint records (config.json `_name_or_path`, or the folder's own name), checked against the
model's family and its layers x heads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re

from minference_jax.config_io import SHIPPED_CONFIG_DIR, PatternConfigError, shipped_configs
from minference_jax.models.checkpoint import CheckpointError

CHECKPOINT_DIR = pathlib.Path(__file__).parent / "checkpoints"
_REPO_CONFIGS = ("minference_jax", "configs")
_REPO_CHECKPOINTS = ("minference_jax", "checkpoints")


def shipped_checkpoints() -> dict[str, pathlib.Path]:
    """Name -> folder of each model checkpoint shipped with the package."""
    return {p.name: p for p in sorted(CHECKPOINT_DIR.iterdir()) if (p / "config.json").is_file()}


def _shipped_name(text: str, repo_folder: tuple[str, ...], suffix: str = "") -> str:
    """The name a missing path stands for: itself when bare, its last part when it is written
    as a repository path (`minference_jax/configs/NAME.json`), else '' (no name)."""
    path = pathlib.PurePath(text.rstrip("/" + os.sep) or text)
    if len(path.parts) > 1 and path.parent.parts[-2:] != repo_folder:
        return ""
    name = path.name
    return name[: -len(suffix)] if suffix and name.endswith(suffix) else name


def resolve_pattern_config(name_or_path: str | os.PathLike) -> pathlib.Path:
    """The pattern config file meant: an existing path, else a shipped config's name.

    Raises PatternConfigError naming the shipped configs when it is neither."""
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return pathlib.Path(text)
    shipped = shipped_configs()
    name = _shipped_name(text, _REPO_CONFIGS, ".json")
    if name in shipped:
        return shipped[name]
    raise PatternConfigError(
        f"pattern config not found: {text} is not a file, nor the name of a shipped config "
        f"({', '.join(shipped)})"
    )


def resolve_checkpoint(name_or_path: str | os.PathLike) -> pathlib.Path:
    """The checkpoint folder meant: an existing path, else a shipped model's name.

    Raises CheckpointError naming the shipped models when it is neither, or when the path is
    a file."""
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        if not os.path.isdir(text):
            raise CheckpointError(f"{text} is a file; --model takes a checkpoint folder")
        return pathlib.Path(text)
    shipped = shipped_checkpoints()
    name = _shipped_name(text, _REPO_CHECKPOINTS)
    if name in shipped:
        return shipped[name]
    raise CheckpointError(
        f"checkpoint folder not found: {text} is not a folder, nor the name of a shipped model "
        f"({', '.join(shipped)})"
    )


@dataclasses.dataclass(frozen=True)
class ModelConfigs:
    """A shipped pattern config and the models it was made for."""

    config: str  # file stem in minference_jax/configs/
    models: tuple[str, ...]  # model names as published (Hugging Face) or shipped
    family: str  # ModelConfig.family
    num_layers: int
    num_heads: int


# The original MInference's own table maps Hugging Face model names to its configs the same way
# (the Gradient 1048k/4194k models reuse the 262k config there too).
SHIPPED_FOR_MODELS = (
    ModelConfigs(
        "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern",
        (
            "Llama-3-8B-Instruct-262k",
            "Llama-3-8B-Instruct-Gradient-1048k",
            "Llama-3-8B-Instruct-Gradient-4194k",
        ),
        "llama",
        32,
        32,
    ),
    ModelConfigs(
        "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern",
        ("Llama-3.1-8B-Instruct",),
        "llama",
        32,
        32,
    ),
    ModelConfigs(
        "Qwen2.5_7B_Instruct_128k_instruct_kv_out_v32_fit_o_best_pattern",
        ("Qwen2.5-7B-Instruct",),
        "qwen2",
        28,
        28,
    ),
    ModelConfigs(
        "Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern",
        ("Phi-3-mini-128k-instruct",),
        "phi3",
        32,
        32,
    ),
    # Searched here (see minference_jax/configs/README.md); "qwen-coder-1.5b" is the folder
    # name benchmarks/RESULTS.md converts its GGUF into.
    ModelConfigs(
        "qwen2_5_coder_1_5b_instruct_searched",
        ("Qwen2.5-Coder-1.5B-Instruct", "qwen-coder-1.5b"),
        "qwen2",
        28,
        12,
    ),
    ModelConfigs("pytext_12m_searched", ("pytext-12m",), "llama", 8, 6),
    ModelConfigs("passkey_tiny_searched", ("passkey-tiny",), "llama", 2, 4),
)


def _words(name: str) -> tuple[str, ...]:
    """'Meta-Llama-3.1-8B-Instruct' -> ('meta', 'llama', '3.1', '8b', 'instruct')."""
    return tuple(w for w in re.split(r"[^a-z0-9.]+|(?<![0-9])\.|\.(?![0-9])", name.lower()) if w)


def _contains(words: tuple[str, ...], part: tuple[str, ...]) -> bool:
    return any(words[i : i + len(part)] == part for i in range(len(words) - len(part) + 1))


def recorded_names(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """(where, name) of every model name a checkpoint folder records, most specific first."""
    folder = pathlib.Path(folder)
    names = []
    try:
        hf_config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        hf_config = None
    if isinstance(hf_config, dict) and isinstance(hf_config.get("_name_or_path"), str):
        names.append(("config.json _name_or_path", hf_config["_name_or_path"]))
    names.append(("folder name", folder.resolve().name))
    return names


@dataclasses.dataclass(frozen=True)
class ConfigMatch:
    """The shipped config chosen for a model (None: none fits), and why, in words."""

    config: str | None
    reason: str

    @property
    def path(self) -> pathlib.Path | None:
        return None if self.config is None else SHIPPED_CONFIG_DIR / f"{self.config}.json"


def match_pattern_config(folder, family: str, num_layers: int, num_heads: int) -> ConfigMatch:
    """The shipped pattern config made for the model in `folder`, if one is.

    A config is picked when a name the checkpoint records contains one of its models' names
    (whole words, case ignored: 'Qwen/Qwen2.5-7B-Instruct' and 'qwen2.5-7b-instruct-q4_k_m'
    both name Qwen2.5-7B-Instruct) and the model has its family and layers x heads."""
    names = recorded_names(folder)
    shape = f"{family}, {num_layers} layers x {num_heads} heads"
    misfits = []
    for where, name in names:
        for entry in SHIPPED_FOR_MODELS:
            known = next((m for m in entry.models if _contains(_words(name), _words(m))), None)
            if known is None:
                continue
            fits = (entry.family, entry.num_layers, entry.num_heads) == (
                family,
                num_layers,
                num_heads,
            )
            if fits:
                reason = f"shipped for {known}, matched by the {where} {name!r}; {shape}"
                return ConfigMatch(entry.config, reason)
            misfits.append(
                f"the {where} {name!r} names {known}, but {entry.config} is for "
                f"{entry.family}, {entry.num_layers} layers x {entry.num_heads} heads and this "
                f"model is {shape}"
            )
    if misfits:
        return ConfigMatch(None, "; ".join(misfits))
    recorded = ", ".join(f"{where} {name!r}" for where, name in names)
    return ConfigMatch(None, f"none is made for a model of the name it records ({recorded})")
