"""Where the index's block sizes come from: 128-row blocks only where the Mosaic kernel runs."""

import jax.numpy as jnp
import pytest

from minference_jax import patterns as P
from minference_jax.attention import default_blocks, layer_plan

VS = P.VerticalSlash(30, 100)
BLOCK = P.BlockSparse(4)


@pytest.mark.parametrize(
    "patterns, implementation, dtype, head_dim, expected",
    [
        ([VS, VS], "mosaic", jnp.bfloat16, 128, (128, 128)),
        ([VS, VS], "mosaic", jnp.float16, 64, (128, 128)),
        ([VS, BLOCK], "mosaic", jnp.bfloat16, 128, (128, 64)),  # 64-key blocks for top-k
        ([BLOCK, P.BlockSparse(4, 128)], "mosaic", jnp.bfloat16, 128, (64, 64)),  # mixed sizes
        # Token-level columns and diagonals fit any key tile; query-aware heads pick key blocks.
        ([VS, P.AdaptiveVerticalSlash(0.9)], "mosaic", jnp.bfloat16, 64, (128, 128)),
        ([P.AdaptiveVerticalSlash(0.9, query_aware=0.2)], "mosaic", jnp.bfloat16, 64, (128, 64)),
        ([P.AntiDiagonalBlockSparse(0.9, block_size=128)], "mosaic", jnp.bfloat16, 64, (128, 128)),
        ([VS, VS], "mosaic", jnp.float32, 128, (64, 64)),  # f32: Triton
        ([VS, VS], "mosaic", jnp.bfloat16, 96, (64, 64)),  # head_dim it does not take
        ([VS, VS], "mosaic", None, None, (64, 64)),  # dtype unknown
        ([VS, VS], "pallas", jnp.bfloat16, 128, (64, 64)),
        ([VS, VS], "xla", jnp.bfloat16, 128, (64, 64)),
        ([VS, VS], None, jnp.bfloat16, 128, (64, 64)),  # CPU: not Hopper
    ],
)
def test_default_blocks(patterns, implementation, dtype, head_dim, expected):
    assert default_blocks(patterns, implementation, dtype, head_dim) == expected


def test_layer_plan_uses_the_default_blocks_unless_given():
    plan, _ = layer_plan([VS, BLOCK], 1000, 2, "mosaic", dtype=jnp.bfloat16, head_dim=128)
    assert (plan.block_q, plan.block_kv) == (128, 64)
    plan, _ = layer_plan([VS, VS], 1000, 2, "mosaic", block_kv=64, dtype=jnp.bfloat16, head_dim=64)
    assert (plan.block_q, plan.block_kv) == (128, 64)
    plan, _ = layer_plan([VS, VS], 1000, 2, "xla", dtype=jnp.bfloat16, head_dim=64)
    assert (plan.block_q, plan.block_kv) == (64, 64)
