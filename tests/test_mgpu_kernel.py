"""The Mosaic GPU sparse kernel: its column pre-gather and masks (CPU), the kernel in the Mosaic
GPU interpreter (CPU), and the GPU suite (marked)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from minference_jax import patterns as P
from minference_jax.index_approx import build_sparse_index
from minference_jax.reference import sparse_attention_reference
from minference_jax.sparse_index import SENTINEL, block_mask_from_index, vertical_slash_index
from pallas_kernels.sparse_flash_mgpu import (
    column_valid_words,
    sparse_flash_attention_mgpu,
    supports,
)
from tests.million_tokens import check_one_million_tokens
from tests.oracles import random_qkv, rel_err

MIXED = (P.VerticalSlash(40, 120), P.AShape(70, 100), P.BlockSparse(3), P.Dense())


def test_column_valid_words_match_the_index_mask():
    """Bit j of word w: column slot 32w + j attended by the query block (brute force from the
    index's own dense block mask)."""
    n, heads = 1000, 3
    rng = np.random.default_rng(1)
    verticals = rng.integers(0, n, (2, heads, 70))
    slashes = np.concatenate([rng.integers(0, n, (2, heads, 5)), np.full((2, heads, 1), 700)], -1)
    index = vertical_slash_index(
        jnp.asarray(verticals, jnp.int32),
        jnp.asarray(slashes, jnp.int32),
        seq_len=n,
        block_q=128,
        block_kv=64,
    )
    c_pad = 128
    words = np.asarray(column_valid_words(index, c_pad)).view(np.uint32)
    assert words.shape == (2, heads, index.num_q_blocks, c_pad // 32)
    bits = (words[..., None] >> np.arange(32, dtype=np.uint32)) & 1
    bits = bits.reshape(*words.shape[:3], c_pad).astype(bool)
    count = np.asarray(index.column_count)
    columns = np.asarray(index.column_index)
    keys = np.asarray(block_mask_from_index(index))  # [B, H, nqb, keys]
    no_columns = dataclasses.replace(index, column_count=jnp.zeros_like(index.column_count))
    blocks_only = np.asarray(block_mask_from_index(no_columns))  # D and listed blocks
    for b in range(2):
        for h in range(heads):
            for i in range(index.num_q_blocks):
                for slot in range(c_pad):
                    col = columns[b, h, slot] if slot < columns.shape[-1] else SENTINEL
                    want = slot < count[b, h, i] and not blocks_only[b, h, i, col]
                    assert bits[b, h, i, slot] == want, (b, h, i, slot)
                    if want:
                        assert keys[b, h, i, col]
    assert bits.any() and not bits.all()


def test_supports():
    assert supports(jnp.bfloat16, 128, 128, 64) and supports(jnp.float16, 64, 64, 64)
    assert not supports(jnp.float32, 128, 128, 64)
    assert not supports(jnp.bfloat16, 96, 128, 64)  # head_dim not 64 or 128
    assert supports(jnp.bfloat16, 128, 128, 128, stages=3)  # 224 KiB of shared memory
    assert not supports(jnp.bfloat16, 128, 128, 128, stages=4)
    assert not supports(jnp.bfloat16, 128, 128, 64, stages=1)
    assert not supports(jnp.bfloat16, 128, 32, 32)
    assert not supports(jnp.bfloat16, 128, 64, 128)


INTERPRET_CASES = [
    # dtype, batch, n, heads, kv_heads, dim, patterns, block_q, block_kv
    (jnp.bfloat16, 2, 150, 2, 1, 64, (P.VerticalSlash(20, 60), P.BlockSparse(2)), 128, 64),
    pytest.param(
        jnp.float16,
        1,
        200,
        2,
        1,
        64,
        (P.VerticalSlash(30, 90), P.BlockSparse(3, 128)),
        128,
        128,
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("dtype, batch, n, heads, kv_heads, dim, patterns, bq, bk", INTERPRET_CASES)
def test_kernel_interpret_matches_reference(
    dtype, batch, n, heads, kv_heads, dim, patterns, bq, bk
):
    """The Mosaic GPU interpreter on CPU: the walk, the masks, the barriers and the TMA ring
    (P goes through shared memory there: the interpreter has no register-operand wgmma)."""
    q, k, v = random_qkv(n + bq, batch, n, heads, kv_heads, dim, dtype)
    index = build_sparse_index(q, k, patterns, block_q=bq, block_kv=bk)
    out = sparse_flash_attention_mgpu(q, k, v, index, interpret=True, poison=True)
    ref = sparse_attention_reference(q, k, v, index)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert not np.isnan(np.asarray(out, np.float32)).any(), "unwritten (NaN-poisoned) elements"
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("q_innermost", [True, False])
def test_either_launch_order_gives_the_same_output(q_innermost):
    q, k, v = random_qkv(11, 2, 300, 2, 1, 64, jnp.bfloat16)
    patterns = (P.VerticalSlash(20, 60), P.AShape(16, 64))
    index = build_sparse_index(q, k, patterns, block_q=128, block_kv=128)
    out = sparse_flash_attention_mgpu(
        q, k, v, index, interpret=True, poison=True, q_innermost=q_innermost
    )
    ref = sparse_attention_reference(q, k, v, index)
    assert not np.isnan(np.asarray(out, np.float32)).any(), "unwritten (NaN-poisoned) elements"
    assert rel_err(out, ref) < 1e-2


def test_poisoned_output_shows_elements_the_kernel_did_not_write(monkeypatch):
    """The NaN-poisoned buffer is what the kernel writes into: a kernel body that writes
    nothing leaves every element NaN (so the checks above would catch a skipped tile)."""
    from pallas_kernels import sparse_flash_mgpu

    monkeypatch.setattr(sparse_flash_mgpu, "_kernel", lambda *refs, **params: None)
    q, k, v = random_qkv(7, 1, 136, 2, 1, 64, jnp.bfloat16)  # a shape no other test traces
    index = build_sparse_index(q, k, P.Dense(), block_q=128, block_kv=64)
    out = sparse_flash_attention_mgpu(q, k, v, index, interpret=True, poison=True)
    assert np.isnan(np.asarray(out, np.float32)).all()


@pytest.mark.parametrize("poison", [False, True])
def test_kernel_lowers_for_cuda_without_a_gpu(poison):
    """Layouts and the Mosaic GPU lowering are checked on a CPU-only jaxlib (no compile)."""
    q, k, v = random_qkv(0, 1, 256, 2, 1, 64, jnp.bfloat16)
    index = build_sparse_index(q, k, P.VerticalSlash(16, 64), block_q=128, block_kv=64)
    run = jax.jit(lambda *a: sparse_flash_attention_mgpu(*a, poison=poison))
    run.trace(q, k, v, index).lower(lowering_platforms=("cuda",))


def test_kernel_rejects_bad_inputs():
    q, k, v = random_qkv(0, 1, 128, 2, 1, 64, jnp.bfloat16)
    index = build_sparse_index(q, k, P.Dense(), block_q=128, block_kv=64)
    with pytest.raises(ValueError, match="takes bf16/f16"):
        sparse_flash_attention_mgpu(q.astype(jnp.float32), k, v, index, interpret=True)
    with pytest.raises(ValueError, match="index is for"):
        sparse_flash_attention_mgpu(q[:, :64], k[:, :64], v[:, :64], index, interpret=True)
    small = build_sparse_index(q, k, P.Dense(), block_q=32, block_kv=32)
    with pytest.raises(ValueError, match="block_q in"):
        sparse_flash_attention_mgpu(q, k, v, small, interpret=True)


def test_interpreter_refuses_a_thread_pool_that_would_deadlock(monkeypatch):
    from pallas_kernels import sparse_flash_mgpu

    q, k, v = random_qkv(0, 1, 128, 2, 1, 64, jnp.bfloat16)
    index = build_sparse_index(q, k, P.Dense(), block_q=128, block_kv=64)
    monkeypatch.setenv("PJRT_NPROC", "3")  # 2 consumer + 1 producer warpgroups + the caller: 4
    assert sparse_flash_mgpu.cpu_client_threads() == 3
    with pytest.raises(RuntimeError, match="PJRT_NPROC=8"):
        sparse_flash_attention_mgpu(q, k, v, index, interpret=True)
    monkeypatch.setenv("PJRT_NPROC", "")
    monkeypatch.setenv("NPROC", "5")
    assert sparse_flash_mgpu.cpu_client_threads() == 5


GPU_CASES = [
    (2, 1000, 32, 8, 128, MIXED * 8, 128, 64),
    (1, 4096 + 17, 32, 8, 128, MIXED * 8, 128, 64),
    (2, 4096 + 17, 8, 2, 64, (P.VerticalSlash(100, 300), P.AShape(128, 512)) * 4, 128, 128),
    (1, 1000, 4, 4, 128, (P.VerticalSlash(5000, 5000), P.BlockSparse(1000)) * 2, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("in_place", [True, False], ids=["registers", "smem"])
@pytest.mark.parametrize("batch, n, heads, kv_heads, dim, patterns, bq, bk", GPU_CASES)
def test_kernel_gpu_matches_reference(
    dtype, in_place, batch, n, heads, kv_heads, dim, patterns, bq, bk
):
    q, k, v = random_qkv(n + dim, batch, n, heads, kv_heads, dim, dtype)
    index = build_sparse_index(q, k, patterns, block_q=bq, block_kv=bk)
    out = sparse_flash_attention_mgpu(q, k, v, index, in_place=in_place, poison=True)
    ref = sparse_attention_reference(q, k, v, index)
    assert not np.isnan(np.asarray(out, np.float32)).any(), "unwritten (NaN-poisoned) elements"
    assert rel_err(out, ref) < 1e-2


@pytest.mark.gpu
def test_kernel_gpu_one_million_tokens_32_heads():
    check_one_million_tokens(sparse_flash_attention_mgpu, block_q=128)


def test_default_kernel_is_mosaic_only_on_hopper_for_measured_shapes(monkeypatch):
    from minference_jax import attention

    q, k, _ = random_qkv(0, 1, 256, 2, 1, 128, jnp.bfloat16)
    index128 = build_sparse_index(q, k, P.AShape(16, 64), block_q=128, block_kv=64)
    index64 = build_sparse_index(q, k, P.AShape(16, 64), block_q=64, block_kv=64)
    choose = attention.default_sparse_kernel
    monkeypatch.setattr(attention, "_hopper", lambda: True)
    assert choose(jnp.bfloat16, 128, index128) == "mosaic"
    assert choose(jnp.float16, 128, index128) == "mosaic"
    assert choose(jnp.float32, 128, index128) == "pallas"
    assert choose(jnp.bfloat16, 96, index128) == "pallas"
    assert choose(jnp.bfloat16, 128, index64) == "pallas"  # one consumer warpgroup: no faster
    monkeypatch.setattr(attention, "_hopper", lambda: False)  # A100, or no GPU
    assert choose(jnp.bfloat16, 128, index128) == "pallas"


@pytest.mark.parametrize("hopper, expected", [(True, "mosaic"), (False, "pallas")])
def test_dispatch_runs_the_chosen_kernel(monkeypatch, hopper, expected):
    from minference_jax import attention

    calls = []

    def stub(name):
        def kernel(q, k, v, index, **kwargs):
            calls.append(name)
            return q

        return kernel

    monkeypatch.setattr(attention, "_hopper", lambda: hopper)
    monkeypatch.setattr(attention, "sparse_flash_attention", stub("pallas"))
    monkeypatch.setattr(attention.sparse_flash_mgpu, "sparse_flash_attention_mgpu", stub("mosaic"))
    q, k, v = random_qkv(0, 1, 512, 2, 1, 128, jnp.bfloat16)
    index = build_sparse_index(q, k, P.AShape(16, 64), block_q=128, block_kv=64)
    attention._sparse_or_dense(q, k, v, index, 0.1, interpret=True)
    assert calls == [expected]
    attention.attend_with_index(q, k, v, index, scale=0.1, implementation="mosaic")
    assert calls[-1] == "mosaic"  # forced, whatever the device


@pytest.mark.slow
def test_kernel_benchmark_mosaic_column_interpret_smoke(tmp_path):
    import json

    from benchmarks import kernels

    kernels.main(
        [
            "--seq-lens",
            "128",
            "--interpret",
            "--backend",
            "mosaic",
            "--block-q",
            "128",
            "--repeats",
            "1",
            "--cases",
            "a_shape",
            "--launch",
            "q-innermost",
            "heads-innermost",
            "--out",
            str(tmp_path),
        ]
    )
    (result,) = tmp_path.glob("*_mosaic_*.json")
    rows = json.loads(result.read_text())
    assert [r["launch"] for r in rows] == ["q-innermost", "heads-innermost"]
    assert all(r["backend"] == "mosaic" and r["spot_rel_err"] < 1e-2 for r in rows)


def test_kernel_benchmark_refuses_a_launch_order_for_the_triton_kernel(capsys):
    from benchmarks import kernels

    with pytest.raises(SystemExit):
        kernels.main(["--seq-lens", "128", "--interpret", "--launch", "q-innermost"])
    assert "--launch applies to --backend mosaic only" in capsys.readouterr().err


@pytest.mark.parametrize("capability, hopper", [("9.0", True), ("8.0", False), ("10.0", False)])
def test_hopper_is_compute_capability_9(monkeypatch, capability, hopper):
    import types

    from minference_jax import attention

    monkeypatch.setattr(attention, "_on_gpu", lambda: True)
    device = types.SimpleNamespace(compute_capability=capability)
    monkeypatch.setattr(attention.jax, "devices", lambda *a: [device])
    assert attention._hopper() == hopper
