"""The examples/ scripts run, and `nnx_attention_fn` is exact inside nnx.MultiHeadAttention."""

import pathlib
import runpy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minference_jax import AShape, VerticalSlash, nnx_attention_fn, sparse_attention

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def run_example(name: str) -> dict:
    return runpy.run_path(str(EXAMPLES / name), run_name="example")


def test_every_example_is_tested():
    assert {p.name for p in EXAMPLES.glob("*.py")} == {
        "nnx_multihead_attention.py",
        "nnx_rope_gqa_block.py",
    }


def test_multihead_attention_example():
    results = run_example("nnx_multihead_attention.py")["main"](seq_len=400)
    assert results["whole-prompt A-shape"] < 1e-5  # covers every causal key: dense
    assert results["AShape(64, 256)"] > 1e-2 and results["BlockSparse(top_k=4)"] > 1e-2


def test_rope_gqa_block_example():
    relative = run_example("nnx_rope_gqa_block.py")["main"](seq_len=700)
    assert 1e-3 < relative < 1.0  # the searched budgets skip keys at 700 tokens, not most


def _layer(attention_fn, num_heads=6, num_kv_heads=2, seed=3):
    return nnx.MultiHeadAttention(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        in_features=48,
        attention_fn=attention_fn,
        decode=False,
        rngs=nnx.Rngs(seed),
    )


def test_nnx_attention_fn_matches_the_sparse_oracle():
    patterns = (VerticalSlash(8, 32), AShape(3, 40)) * 3  # per query head
    x = jax.random.normal(jax.random.key(np.random.randint(2**31)), (2, 171, 48))  # not % 32
    layer = _layer(nnx_attention_fn(patterns, block_q=32, block_kv=32))
    q, k, v = layer.query(x), layer.key(x), layer.value(x)
    assert k.shape[2] == 2 and q.shape[2] == 6  # grouped queries reach the sparse path
    oracle = sparse_attention(
        q, k, v, patterns=patterns, block_q=32, block_kv=32, implementation="reference"
    )
    expected = layer.out(oracle)
    np.testing.assert_allclose(layer(x, is_causal=True), expected, rtol=2e-5, atol=2e-5)


def test_nnx_attention_fn_covering_pattern_equals_nnx_dense():
    x = jax.random.normal(jax.random.key(np.random.randint(2**31)), (2, 130, 48))
    dense = _layer(nnx.dot_product_attention)(x, is_causal=True)
    sparse = _layer(nnx_attention_fn(AShape(0, 130)))(x, is_causal=True)
    np.testing.assert_allclose(sparse, dense, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (dict(), "is_causal=True"),
        (
            dict(is_causal=True, mask=jnp.ones((1, 1, 64, 64), bool).at[..., 5, 2].set(False)),
            "no other mask",
        ),
    ],
)
def test_nnx_attention_fn_refuses_what_it_cannot_do(call, message):
    x = jnp.ones((1, 64, 48))
    with pytest.raises(ValueError, match=message):
        _layer(nnx_attention_fn(AShape(4, 16)))(x, **call)


def test_nnx_attention_fn_refuses_sowing_and_a_precision():
    x = jnp.ones((1, 64, 48))
    with pytest.raises(ValueError, match="sow"):
        _layer(nnx_attention_fn(AShape(4, 16)))(x, is_causal=True, sow_weights=True)
    layer = nnx.MultiHeadAttention(
        num_heads=2,
        in_features=48,
        precision=jax.lax.Precision.HIGHEST,
        attention_fn=nnx_attention_fn(AShape(4, 16)),
        decode=False,
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match="precision"):
        layer(x, is_causal=True)


def test_nnx_attention_fn_refuses_dropout():
    layer = nnx.MultiHeadAttention(
        num_heads=2,
        in_features=16,
        dropout_rate=0.1,
        attention_fn=nnx_attention_fn(AShape(4, 16)),
        decode=False,
        rngs=nnx.Rngs(0),
    )
    with pytest.raises(ValueError, match="dropout"):
        layer(jnp.ones((1, 64, 16)), is_causal=True, deterministic=False)
