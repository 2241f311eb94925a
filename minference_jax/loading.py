"""`minference_jax.load`: a checkpoint, its tokenizer and the attention its prefill runs.

    import minference_jax

    lm = minference_jax.load()                   # the embedded pytext-12m, its searched config
    lm = minference_jax.load("converted/")        # the shipped config made for it, if any
    lm = minference_jax.load("converted/", pattern_config="my_searched.json")
    lm = minference_jax.load("converted/", attention="dense")  # or "a-shape:64,1024", a Pattern
    print(lm.attention)                           # what its prefill runs, in words
    text = lm.generate("a long prompt ...", max_new_tokens=16)
    result = lm.prefill("a long prompt ...")      # last-token logits, what each layer ran

`python -m minference_jax.prefill` makes the same choice of attention (`choose_attention`).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import warnings

import numpy as np

from minference_jax import patterns as P
from minference_jax.config_io import load_pattern_config
from minference_jax.models import checkpoint
from minference_jax.models.config import ModelConfig
from minference_jax.models.defaults import CHECKPOINT
from minference_jax.models.modeling import AttentionSpec, CausalLM
from minference_jax.pattern_spec import parse_pattern_spec
from minference_jax.shipped import match_pattern_config, resolve_checkpoint, resolve_pattern_config
from minference_jax.tokenization import load_tokenizer

# What "minference" runs on a model no shipped config is made for: the original MInference's
# default budget, one pattern for every head.
FALLBACK_PATTERN = P.VerticalSlash(1000, 6096)


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    patterns: P.HeadPatterns | None  # None: dense
    name: str  # short: a config's name or path, a pattern, or "dense"
    description: str  # in words, for reports
    warning: str | None = None  # set when "minference" found no config made for the model


def _uniform(pattern: P.Pattern, config: ModelConfig) -> AttentionChoice:
    table = P.HeadPatterns.uniform(pattern, config.num_layers, config.num_heads)
    return AttentionChoice(table, repr(pattern), f"{pattern} on every head")


def _from_config(path, name: str, config: ModelConfig, why: str = "") -> AttentionChoice:
    table = load_pattern_config(path, num_layers=config.num_layers, num_heads=config.num_heads)
    description = f"per-head patterns from {name}" + (f" ({why})" if why else "")
    return AttentionChoice(table, name, description)


def choose_attention(
    folder: str | os.PathLike,
    config: ModelConfig,
    attention: str | P.Pattern | P.HeadPatterns = "minference",
    *,
    pattern_config: str | os.PathLike | None = None,
) -> AttentionChoice:
    """The patterns a prefill of the model in `folder` runs.

    attention:
    - "minference": `pattern_config` (a path or a shipped config's name) when given; else the
      shipped config made for this model (`shipped.match_pattern_config`: by the model name
      its checkpoint records, layers x heads checked); else FALLBACK_PATTERN on every head,
      with a warning saying so;
    - "dense";
    - a prefill mode ("a-shape", "block-sparse", "anti-diagonal", "adaptive-vs": its default
      budget on every head), or a pattern spec such as "a-shape:64,1024" or "avs:0.95"
      (`minference_jax.pattern_spec`), or a Pattern: that pattern on every head;
    - a HeadPatterns: one pattern per (layer, head), checked against the model.
    Raises ValueError (PatternConfigError for configs) on what cannot run on this model.
    """
    if pattern_config is not None and not (
        isinstance(attention, str) and attention == "minference"
    ):
        raise ValueError(f"pattern_config goes with attention='minference', not {attention!r}")
    if isinstance(attention, P.HeadPatterns):
        attention.check_model(config.num_layers, config.num_heads)
        return AttentionChoice(attention, "custom", "per-head patterns given by the caller")
    if isinstance(attention, P.PATTERN_TYPES):
        return _uniform(attention, config)
    if not isinstance(attention, str):
        raise TypeError(
            "attention must be a mode name, a pattern spec, a Pattern or HeadPatterns, got "
            f"{type(attention).__name__}"
        )
    if attention == "dense":
        return AttentionChoice(None, "dense", "dense on every head")
    if attention == "minference":
        if pattern_config is not None:
            path = resolve_pattern_config(pattern_config)
            return _from_config(path, os.fspath(pattern_config), config)
        match = match_pattern_config(folder, config.family, config.num_layers, config.num_heads)
        if match.config is not None:
            return _from_config(match.path, match.config, config, match.reason)
        choice = _uniform(FALLBACK_PATTERN, config)
        fallback = f"VerticalSlash({FALLBACK_PATTERN.n_vertical}, {FALLBACK_PATTERN.n_slash})"
        warning = (
            f"no shipped pattern config fits this model: {match.reason}. Running {fallback} on "
            "every head, the original MInference's default, not tuned for this model; search "
            "a config with `minference-search --model MODEL --out config.json` and pass it as "
            "--pattern-config (Python: pattern_config=)"
        )
        return dataclasses.replace(choice, warning=warning)
    if attention in P.MODE_PATTERNS:
        return _uniform(P.pattern_for_mode(attention), config)
    return _uniform(parse_pattern_spec(attention), config)


def load_checkpoint(
    model: str | os.PathLike | None = None, dtype=None
) -> tuple[pathlib.Path, CausalLM, ModelConfig]:
    """(folder, model, config) of a checkpoint path or shipped name (None: the embedded
    pytext-12m). dtype: a name ("bfloat16") or a jnp dtype; None keeps the stored dtype
    (float32 for Hugging Face folders, the embedded model included).

    Raises CheckpointError / ModelConfigError (ValueError) on a missing or broken checkpoint."""
    import jax.numpy as jnp

    folder = CHECKPOINT if model is None else resolve_checkpoint(model)
    dtype = None if dtype is None else jnp.dtype(dtype)
    # Through the module, so that tests can stand in for load_model.
    loaded, config = checkpoint.load_model(folder, dtype)
    return folder, loaded, config


@dataclasses.dataclass(frozen=True, eq=False)
class LoadedModel:
    """A model ready to prefill with the attention chosen for it (see `load`)."""

    model: CausalLM
    config: ModelConfig
    tokenizer: object | None  # None: the checkpoint has no tokenizer.json (pass token ids)
    patterns: P.HeadPatterns | None  # None: dense
    attention: str  # what the prefill runs, in words
    path: pathlib.Path

    @property
    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.patterns)

    def encode(self, prompt: str | np.ndarray) -> np.ndarray:
        """Token ids [batch, tokens] of a text (through the tokenizer) or of ids given."""
        if not isinstance(prompt, str):
            ids = np.asarray(prompt)
            return ids[None] if ids.ndim == 1 else ids
        if self.tokenizer is None:
            raise ValueError(f"{self.path} has no tokenizer.json: pass token ids, not text")
        ids = np.asarray(self.tokenizer.encode(prompt))[None]
        if ids.shape[1] == 0:
            raise ValueError("empty prompt (no tokens)")
        return ids

    def prefill(self, prompt: str | np.ndarray, **kwargs):
        """`models.generation.prefill` of the prompt with this model's attention."""
        from minference_jax.models.generation import prefill

        return prefill(self.model, self.encode(prompt), self.spec, **kwargs)

    def generate(self, prompt: str | np.ndarray, max_new_tokens: int = 32, **kwargs):
        """Greedy continuation (sparse prefill, dense decoding): text for a text prompt, token
        ids [batch, max_new_tokens] for token ids."""
        from minference_jax.models.generation import generate

        tokens, _ = generate(self.model, self.encode(prompt), max_new_tokens, self.spec, **kwargs)
        if isinstance(prompt, str):
            return self.tokenizer.decode(tokens[0].tolist())
        return tokens


def load(
    model: str | os.PathLike | None = None,
    attention: str | P.Pattern | P.HeadPatterns = "minference",
    *,
    pattern_config: str | os.PathLike | None = None,
    dtype=None,
) -> LoadedModel:
    """Load a checkpoint (a converted or Hugging Face folder, or a shipped model's name; None:
    the embedded pytext-12m) with its tokenizer, and choose the attention its prefill runs
    (`choose_attention`). Warns (UserWarning) when "minference" finds no pattern config for
    the model and falls back to one pattern everywhere.
    """
    folder, loaded, config = load_checkpoint(model, dtype)
    tokenizer = load_tokenizer(folder, config.vocab_size)
    choice = choose_attention(folder, config, attention, pattern_config=pattern_config)
    if choice.warning:
        warnings.warn(choice.warning, UserWarning, stacklevel=2)
    return LoadedModel(loaded, config, tokenizer, choice.patterns, choice.description, folder)
