"""The 1M-token x 32-head GPU check both sparse kernels run (64-bit addressing)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from minference_jax.reference import sparse_attention_xla
from minference_jax.sparse_index import vertical_slash_index
from tests.oracles import random_qkv, rel_err


def check_one_million_tokens(kernel, *, block_q: int) -> None:
    """kernel(q, k, v, index) on 1M tokens x 32 q / 8 kv heads x 128 (one launch) against the
    XLA sparse path in f32 on spot query blocks of the last kv group (the far end of every
    address; f32 copies of every head would not fit beside the inputs), and no NaN in the first
    group's last block."""
    n, heads, kv_heads = 1 << 20, 32, 8
    q, k, v = random_qkv(1, 1, n, heads, kv_heads, 128, jnp.bfloat16)
    rng = np.random.default_rng(0)
    verticals = np.concatenate(
        [np.broadcast_to(np.arange(30), (1, heads, 30)), rng.integers(30, n, (1, heads, 970))],
        axis=-1,
    )
    slashes = np.broadcast_to(np.arange(6096), (1, heads, 6096))
    index = vertical_slash_index(
        jnp.asarray(verticals, jnp.int32),
        jnp.asarray(slashes, jnp.int32),
        seq_len=n,
        block_q=block_q,
        block_kv=64,
    )
    out = kernel(q, k, v, index)
    group = heads // kv_heads
    last = slice(heads - group, heads)
    blocks = np.array([0, 1, 777, index.num_q_blocks // 2, index.num_q_blocks - 1])
    ref = sparse_attention_xla(
        q[:, :, last].astype(jnp.float32),
        k[:, :, -1:].astype(jnp.float32),
        v[:, :, -1:].astype(jnp.float32),
        jax.tree.map(lambda a: a[:, last], index),
        query_blocks=blocks,
    )
    rows = (blocks[:, None] * block_q + np.arange(block_q)).reshape(-1)
    got = out[:, rows, last]
    assert not np.isnan(np.asarray(got, np.float32)).any()
    assert rel_err(got, ref) < 1e-2
    assert not np.isnan(np.asarray(out[:, -block_q:, :group], np.float32)).any()
