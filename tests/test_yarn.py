"""YaRN RoPE scaling (arXiv 2309.00071) as transformers' `_compute_yarn_parameters` does it.

No torch here: the frequencies are checked against an independent float64 restatement of the
paper's formulas (below) over a sweep of configs, and against transformers' own inv_freq and
attention scaling recorded in the qwen2_yarn fixture (tests/fixtures/make_hf_fixtures.py).
"""

import itertools
import math
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from convert.checkpoint import load_hf
from minference_jax.models import ModelConfigError
from minference_jax.models.config import ModelConfig, RopeConfig
from minference_jax.models.generation import generate
from minference_jax.models.rope import decode_rope_tables, inverse_frequencies, rope_tables
from tests.oracles import rel_err

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "hf" / "qwen2_yarn"


def reference_yarn(
    dim,
    theta,
    factor,
    original,
    beta_fast=32.0,
    beta_slow=1.0,
    truncate=True,
    attention_factor=None,
    mscale=None,
    mscale_all_dim=None,
):
    """(inv_freq, attention factor) in float64, restated from the paper.

    Band d rotates at theta_d = theta^(-2d/D) and turns r(d) = L / (2 pi / theta_d) times over the
    original context L. The ramp runs in band-index space between the bands where r = beta_fast
    and r = beta_slow (rounded outwards when truncating, as the YaRN reference code does):
    gamma = 1 keeps theta_d, gamma = 0 divides it by the scale s. Eq. 21: sqrt(1/t) = 0.1 ln s + 1.
    """
    d = np.arange(dim // 2, dtype=np.float64)
    theta_d = np.power(float(theta), -2.0 * d / dim)

    def band_where_rotations(r):  # solve L * theta^(-2d/D) / (2 pi) = r for d
        return (dim / 2.0) * np.log(original / (2.0 * np.pi * r)) / np.log(theta)

    lo, hi = band_where_rotations(beta_fast), band_where_rotations(beta_slow)
    if truncate:
        lo, hi = np.floor(lo), np.ceil(hi)
    lo, hi = max(lo, 0.0), min(hi, dim - 1.0)
    if lo == hi:
        hi = hi + 1e-3
    gamma = 1.0 - np.clip((d - lo) / (hi - lo), 0.0, 1.0)
    inv_freq = theta_d * (gamma + (1.0 - gamma) / factor)

    def eq21(m):
        return 0.1 * m * math.log(factor) + 1.0 if factor > 1 else 1.0

    if attention_factor is None:
        attention_factor = (
            eq21(mscale) / eq21(mscale_all_dim) if mscale and mscale_all_dim else eq21(1)
        )
    return inv_freq, attention_factor


def _hf(rope_parameters=None, rope_scaling=None, **top):
    hf = {
        "model_type": "qwen2",
        "vocab_size": 32,
        "hidden_size": 256,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "max_position_embeddings": 131072,
        **top,
    }
    if rope_parameters is not None:
        hf["rope_parameters"] = rope_parameters
    if rope_scaling is not None:
        hf["rope_scaling"] = rope_scaling
    return hf


SWEEP = [
    dict(dim=dim, theta=theta, factor=factor, original=original, truncate=truncate)
    for factor, dim, theta, original, truncate in itertools.product(
        (2.0, 4.0, 8.0), (64, 128), (1e4, 1e6), (2048, 32768), (True, False)
    )
] + [
    dict(dim=128, theta=1e6, factor=4.0, original=32768, attention_factor=0.9),
    dict(dim=64, theta=1e4, factor=8.0, original=2048, attention_factor=1.25, truncate=False),
    dict(dim=128, theta=1e4, factor=40.0, original=4096, mscale=1.0, mscale_all_dim=1.0),
    dict(dim=128, theta=1e4, factor=40.0, original=4096, mscale=0.707, mscale_all_dim=1.0),
    dict(dim=64, theta=1e6, factor=4.0, original=2048, mscale=1.0),  # alone: plain eq. 21
    dict(dim=128, theta=1e6, factor=4.0, original=32768, beta_fast=16.0, beta_slow=2.0),
    dict(dim=64, theta=1e4, factor=2.0, original=2048, beta_fast=64.0, beta_slow=0.5),
    dict(dim=128, theta=1e6, factor=1.0, original=32768),  # factor 1: no-op
    # L / 2pi > theta: the ramp's upper end lies past dim/2 (transformers clips it at dim - 1)
    dict(dim=64, theta=1e4, factor=4.0, original=131072),
    dict(dim=128, theta=1e4, factor=2.0, original=131072, truncate=False),
]


def _config(case):
    case = dict(case)
    dim, theta, factor, original = (case.pop(k) for k in ("dim", "theta", "factor", "original"))
    params = {"rope_type": "yarn", "rope_theta": theta, "factor": factor}
    params |= {"original_max_position_embeddings": original, **case}
    return ModelConfig.from_hf_dict(_hf(params, head_dim=dim))


@pytest.mark.parametrize("case", SWEEP, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_inverse_frequencies_match_the_paper_restatement(case):
    config = _config(case)
    inv_freq, scale = inverse_frequencies(config, seq_len=1)
    want_inv, want_scale = reference_yarn(**case)
    np.testing.assert_allclose(inv_freq, want_inv, rtol=1e-12, atol=0)
    assert scale == pytest.approx(want_scale, rel=1e-12)


def test_sweep_exercises_extrapolated_blended_and_interpolated_bands():
    """Otherwise the restatement comparison could not tell a wrong ramp from a right one."""
    kinds = set()
    for case in SWEEP:
        config = _config(case)
        inv_freq, _ = inverse_frequencies(config, 1)
        base = 1.0 / config.rope.theta ** (np.arange(0, config.head_dim, 2) / config.head_dim)
        ratio = base / inv_freq  # 1: kept, factor: divided, strictly between: blended
        kinds |= {"kept"} if np.any(np.isclose(ratio, 1.0)) else set()
        kinds |= {"divided"} if np.any(np.isclose(ratio, config.rope.factor)) else set()
        inner = (ratio > 1 + 1e-9) & (ratio < config.rope.factor - 1e-9)
        kinds |= {"blended"} if np.any(inner) else set()
    assert kinds == {"kept", "divided", "blended"}


def test_rope_tables_are_static_and_scaled_by_the_attention_factor():
    """transformers computes YaRN once at init: no dependence on the sequence length."""
    case = dict(dim=128, theta=1e6, factor=4.0, original=32768)
    config = _config(case)
    want_inv, want_scale = reference_yarn(**case)
    positions = np.arange(0, 300)
    angles = positions[:, None] * want_inv[None, :]
    angles = np.concatenate([angles, angles], axis=-1)
    for seq_len in (1, 300, 32768, 32769, 131072):
        cos, sin = rope_tables(config, jnp.asarray(positions), seq_len)
        np.testing.assert_allclose(np.asarray(cos), np.cos(angles) * want_scale, atol=1e-4)
        np.testing.assert_allclose(np.asarray(sin), np.sin(angles) * want_scale, atol=1e-4)
    dcos, dsin = decode_rope_tables(config, positions)
    np.testing.assert_array_equal(np.asarray(dcos), np.asarray(cos))
    np.testing.assert_array_equal(np.asarray(dsin), np.asarray(sin))


def test_fixture_frequencies_match_transformers():
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    config = ModelConfig.from_hf_folder(FIXTURE)
    assert config.rope.rope_type == "yarn" and ref["input_ids"].shape[1] > 64  # past original
    inv_freq, scale = inverse_frequencies(config, ref["input_ids"].shape[1])
    np.testing.assert_allclose(inv_freq, ref["rope_inv_freq"], rtol=1e-6)
    assert np.float32(scale) == ref["rope_attention_scaling"][0]
    np.testing.assert_allclose(reference_yarn(16, 1e4, 4.0, 64)[0], ref["rope_inv_freq"], rtol=1e-6)


def test_fixture_greedy_generation_matches_transformers():
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    model, _ = load_hf(FIXTURE, jnp.float32)
    tokens, result = generate(model, ref["input_ids"][:1], ref["greedy_tokens"].shape[1])
    np.testing.assert_array_equal(tokens, ref["greedy_tokens"])
    assert rel_err(result.last_logits, ref["logits"][:1, -1]) < 1e-4


QWEN25 = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


def test_rope_scaling_and_rope_parameters_forms_agree():
    """Qwen2.5's documented rope_scaling form and transformers 5's saved rope_parameters."""
    old = ModelConfig.from_hf_dict(_hf(rope_scaling=QWEN25, rope_theta=1e6))
    new_params = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    new_params["original_max_position_embeddings"] = 32768
    new = ModelConfig.from_hf_dict(_hf(new_params))
    assert old.rope == new.rope
    assert new.rope == RopeConfig(
        theta=1e6, rope_type="yarn", factor=4.0, original_max_position_embeddings=32768
    )


def test_config_fields_and_transformers_defaults():
    extra = {"beta_fast": 16, "beta_slow": 2, "mscale": 0.7, "mscale_all_dim": 1, "truncate": False}
    rope = ModelConfig.from_hf_dict(_hf(rope_scaling={**QWEN25, **extra})).rope
    assert (rope.beta_fast, rope.beta_slow, rope.mscale, rope.mscale_all_dim) == (16, 2, 0.7, 1)
    assert rope.truncate is False
    # a top-level original_max_position_embeddings wins over the rope dict's (transformers'
    # standardize_rope_params); without either it is max_position_embeddings
    top = ModelConfig.from_hf_dict(_hf(rope_scaling=QWEN25, original_max_position_embeddings=4096))
    assert top.rope.original_max_position_embeddings == 4096
    alone = ModelConfig.from_hf_dict(_hf(rope_scaling={"type": "yarn", "factor": 4.0}))
    assert alone.rope.original_max_position_embeddings == 131072
    # a null factor is max_position_embeddings / original; null betas take 32 / 1; a null
    # truncate disables truncation (transformers reads it with .get(..., True))
    nulls = {"factor": None, "beta_fast": None, "beta_slow": None, "truncate": None}
    derived = ModelConfig.from_hf_dict(_hf(rope_scaling={**QWEN25, **nulls})).rope
    assert (derived.factor, derived.beta_fast, derived.beta_slow) == (4.0, 32.0, 1.0)
    assert derived.truncate is False


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"factor": 0.5}, "factor must be >= 1"),
        ({"factor": float("nan")}, "non-finite"),
        ({"factor": float("inf")}, "non-finite"),
        ({"factor": "four"}, "malformed"),
        ({"beta_fast": 1.0, "beta_slow": 2.0}, "beta_slow < beta_fast"),
        ({"beta_fast": 4.0, "beta_slow": 4.0}, "beta_slow < beta_fast"),
        ({"beta_slow": -1.0}, "beta_slow < beta_fast"),
        ({"beta_fast": float("nan")}, "non-finite"),
        ({"attention_factor": 0.0}, "attention_factor must be > 0"),
        ({"attention_factor": -1.0}, "attention_factor must be > 0"),
        ({"mscale": float("inf"), "mscale_all_dim": 1.0}, "non-finite"),
        ({"truncate": "yes"}, "truncate must be true or false"),
        ({"original_max_position_embeddings": -8}, "original_max_position_embeddings"),
    ],
)
def test_bad_yarn_values_raise_model_config_error(bad, message):
    for form in ("rope_scaling", "rope_parameters"):
        with pytest.raises(ModelConfigError, match=message) as err:
            ModelConfig.from_hf_dict(_hf(**{form: {**QWEN25, **bad}}))
        assert "\n" not in str(err.value)
