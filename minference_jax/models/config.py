"""Model configs, built from a Hugging Face `config.json` (frozen, hashable: jit static args)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib

# HF model_type -> our family. Yi checkpoints use the Llama layout and model_type "llama".
SUPPORTED_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "phi3": "phi3"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope", "yarn")


class ModelConfigError(ValueError):
    """config.json is missing, malformed or describes an architecture we do not support."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    original_max_position_embeddings: int | None = None  # llama3, longrope, dynamic, yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    attention_factor: float | None = None  # longrope, yarn: cos/sin scale (derived when None)
    beta_fast: float = 32.0  # yarn: bands with more rotations than this keep their frequency
    beta_slow: float = 1.0  # yarn: bands with fewer rotations than this are divided by factor
    mscale: float | None = None  # yarn: attention_factor numerator (used with mscale_all_dim)
    mscale_all_dim: float | None = None  # yarn: attention_factor denominator
    truncate: bool = True  # yarn: round the ramp's ends to whole dimensions

    def __post_init__(self):
        if self.rope_type not in ROPE_TYPES:
            raise ModelConfigError(
                f"unsupported rope type {self.rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
            )
        if self.rope_type == "yarn":
            self._check_yarn()
        # A zero, negative or NaN theta or factor turns every rotation angle into NaN.
        if not (math.isfinite(self.theta) and self.theta > 1.0):
            raise ModelConfigError(f"rope theta must be a finite number > 1, got {self.theta}")
        if not (math.isfinite(self.factor) and self.factor > 0):
            raise ModelConfigError(
                f"rope scaling factor must be a finite number > 0, got {self.factor}"
            )
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if values is not None and not all(math.isfinite(v) and v > 0 for v in values):
                raise ModelConfigError(f"longrope {name} must hold finite numbers > 0")

    def _check_yarn(self):
        def bad(what):
            raise ModelConfigError(f"yarn rope scaling: {what}")

        finite = [self.factor, self.beta_fast, self.beta_slow]
        finite += [v for v in (self.attention_factor, self.mscale, self.mscale_all_dim) if v]
        if not all(math.isfinite(v) for v in finite):
            bad(f"non-finite value in {finite}")
        if self.factor < 1.0:
            bad(f"factor must be >= 1, got {self.factor}")
        if not self.original_max_position_embeddings or self.original_max_position_embeddings < 1:
            bad(
                f"original_max_position_embeddings must be >= 1, got "
                f"{self.original_max_position_embeddings}"
            )
        if not 0 < self.beta_slow < self.beta_fast:
            bad(
                f"need 0 < beta_slow < beta_fast, got beta_slow={self.beta_slow}, "
                f"beta_fast={self.beta_fast}"
            )
        if self.attention_factor is not None and not self.attention_factor > 0:
            bad(f"attention_factor must be > 0, got {self.attention_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str  # "llama" (Llama 2/3/3.1, Mistral, Yi), "qwen2", "phi3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    rope: RopeConfig = RopeConfig()

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_dict(cls, hf: dict) -> ModelConfig:
        if not isinstance(hf, dict):
            raise ModelConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            arch = hf.get("architectures")
            raise ModelConfigError(
                f"unsupported architecture (model_type={model_type!r}, architectures={arch}); "
                f"supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = _positive_int(hf, "hidden_size")
            heads = _positive_int(hf, "num_attention_heads")
            kv_heads = _positive_int(hf, "num_key_value_heads", heads)
            head_dim = _positive_int(hf, "head_dim", hidden // heads)
            config = cls(
                family=SUPPORTED_MODEL_TYPES[model_type],
                vocab_size=_positive_int(hf, "vocab_size"),
                hidden_size=hidden,
                intermediate_size=_positive_int(hf, "intermediate_size"),
                num_layers=_positive_int(hf, "num_hidden_layers"),
                num_heads=heads,
                num_kv_heads=kv_heads,
                head_dim=head_dim,
                max_position_embeddings=_positive_int(hf, "max_position_embeddings", 4096),
                rms_norm_eps=_number_field(hf, "rms_norm_eps", 1e-6),
                tie_word_embeddings=_bool_field(hf, "tie_word_embeddings", False),
                attention_bias=model_type == "qwen2" or _bool_field(hf, "attention_bias", False),
                rope=_rope_from_hf(hf),
            )
            partial_rotary = _number_field(hf, "partial_rotary_factor", 1.0)
            mlp_bias = _bool_field(hf, "mlp_bias", False)
        except ModelConfigError:
            raise
        except KeyError as err:
            raise ModelConfigError(f"config.json lacks required field {err}") from err
        except (TypeError, ValueError) as err:  # e.g. a string or null where a number belongs
            raise ModelConfigError(f"config.json has a malformed field: {err}") from err
        if heads % kv_heads:
            raise ModelConfigError(f"num_key_value_heads {kv_heads} must divide heads {heads}")
        if mlp_bias:
            raise ModelConfigError("mlp_bias=true is not supported")
        if partial_rotary != 1.0:
            raise ModelConfigError("partial rotary embeddings are not supported")
        if not 0 < config.rms_norm_eps < 1:  # NaN fails too; eps <= 0 can divide by zero
            raise ModelConfigError(
                f"config.json field 'rms_norm_eps' must be in (0, 1), got {config.rms_norm_eps}"
            )
        return config

    @classmethod
    def from_hf_folder(cls, folder: str | os.PathLike) -> ModelConfig:
        return cls.from_hf_dict(read_hf_config(folder))


def _positive_int(hf: dict, key: str, default: int | None = None) -> int:
    """An integer field >= 1; absent or null takes `default` (required when None)."""
    value = hf.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        value = default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ModelConfigError(f"config.json field {key!r} must be an integer >= 1, got {value!r}")
    return value


def _number_field(hf: dict, key: str, default: float) -> float:
    """A finite number field; absent takes `default` (null, strings and booleans are refused)."""
    value = hf.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelConfigError(
            f"config.json has a malformed field {key!r}: must be a finite number, got {value!r}"
        )
    return float(value)


def _bool_field(hf: dict, key: str, default: bool) -> bool:
    """true/false (absent or null: `default`); a string such as "false" is refused, not truthy."""
    value = hf.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelConfigError(
            f"config.json has a malformed field {key!r}: must be true or false, got {value!r}"
        )
    return value


def read_hf_config(folder: str | os.PathLike) -> dict:
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise ModelConfigError(f"no config.json in {folder}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelConfigError(f"{path} is not valid JSON: {err}") from err
    except RecursionError as err:  # pathologically deep nesting
        raise ModelConfigError(f"{path} is nested too deeply to be a model config") from err


def _rope_from_hf(hf: dict) -> RopeConfig:
    """Reads both the transformers 5 `rope_parameters` and the older rope_theta + rope_scaling."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type") or merged.get("type") or "default"
    if rope_type == "su":  # early Phi-3 name of longrope
        rope_type = "longrope"
    original = merged.get("original_max_position_embeddings") or hf.get(
        "original_max_position_embeddings"
    )
    if rope_type == "yarn":
        # transformers lets a top-level value win over the rope dict's, else falls back to
        # max_position_embeddings (standardize_rope_params, run again when the model is built).
        original = hf.get("original_max_position_embeddings") or merged.get(
            "original_max_position_embeddings"
        )
    if rope_type in ("dynamic", "yarn") and original is None:
        original = hf.get("max_position_embeddings")
    factor = merged.get("factor")
    if rope_type in ("longrope", "yarn") and factor is None and original:
        factor = hf["max_position_embeddings"] / original
    truncate = merged.get("truncate", True)
    if rope_type == "yarn" and truncate is not None and not isinstance(truncate, bool):
        raise ModelConfigError(
            f"yarn rope scaling: truncate must be true or false, got {truncate!r}"
        )
    return RopeConfig(
        theta=float(merged.get("rope_theta", hf.get("rope_theta", 10000.0))),
        rope_type=rope_type,
        factor=float(factor if factor is not None else 1.0),
        low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
        high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(original) if original else None,
        short_factor=tuple(map(float, merged["short_factor"]))
        if "short_factor" in merged
        else None,
        long_factor=tuple(map(float, merged["long_factor"])) if "long_factor" in merged else None,
        attention_factor=(
            float(merged["attention_factor"])
            if merged.get("attention_factor") is not None
            else None
        ),
        # transformers reads these with `or` (a null or 0 takes the default) ...
        beta_fast=float(_number(merged, "beta_fast") or 32.0),
        beta_slow=float(_number(merged, "beta_slow") or 1.0),
        mscale=_number(merged, "mscale"),
        mscale_all_dim=_number(merged, "mscale_all_dim"),
        truncate=bool(truncate),  # ... but truncate with .get(): a null disables it
    )


def _number(params: dict, key: str) -> float | None:
    value = params.get(key)
    return None if value is None else float(value)


def longrope_attention_factor(rope: RopeConfig) -> float:
    if rope.attention_factor is not None:
        return rope.attention_factor
    if rope.factor <= 1.0 or not rope.original_max_position_embeddings:
        return 1.0
    return math.sqrt(1 + math.log(rope.factor) / math.log(rope.original_max_position_embeddings))
