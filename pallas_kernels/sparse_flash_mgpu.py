"""Pallas Mosaic GPU flash attention over a SparseIndex: Hopper (sm_90: wgmma), bf16/f16.

The same walk as `sparse_flash.py` (the diagonal set D, the listed blocks, the columns, one
online softmax), written for Hopper: one CTA per (query block, batch, query head) with
`block_q // 64` consumer warpgroups of 64 query rows each and one producer warpgroup. The
producer reads the index (plain scalar loads from global memory) and brings each key/value tile
into a ring of `stages` shared-memory slots with TMA copies at the block offsets it read; the
consumers run QK^T and PV on the tensor cores (wgmma) with an f32 online softmax in exp2.

Steps t of a query block i, in order (every consumer walks the same steps):
  1. t < r: the causal diagonal key blocks (d = t; causal mask);
  2. t < diag_count[i]: the rest of D (dense tiles);
  3. then block_count[i] listed key blocks (dense tiles);
  4. then the column tiles: each query head's columns are gathered once per layer into
     contiguous [batch, q_head, n_columns_padded, head_dim] K and V arrays (`gather_columns`),
     so a column tile is an ordinary TMA tile; a per-(query block, column) bit mask
     (`column_valid_words`) drops padding and the columns D already covers.
Addressing: TMA descriptors address global memory in 64 bits, and the kernel forms only int32
token indices (< 2^30), so 1M tokens x 32 heads (8.6 GB of q) is safe.
For a right-padded batch (`lengths`), the dense tiles are also masked at the sequence's key
length, and columns past it leave the index before the launch (a static switch: the unpadded
program is unchanged).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from minference_jax.sparse_index import (
    SENTINEL,
    SeqLengths,
    SparseIndex,
    check_index_matches_inputs,
    clip_index_to_lengths,
    column_is_covered,
    gather_columns,
    zero_unattended_rows,
)
from pallas_kernels.constants import LOG2E, MASK_VALUE

SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)
ROWS_PER_WARPGROUP = 64  # one wgmma M tile

# The interpreter runs each warpgroup as its own XLA CPU program, blocking inside callbacks at the
# barriers, so all of them (and the calling program) must hold a thread of XLA's CPU client pool at
# once. That pool is sized when JAX starts: PJRT_NPROC, else NPROC, else the usable CPUs.
INTERPRETER_THREADS_ENV = "PJRT_NPROC"


def cpu_client_threads() -> int:
    for name in (INTERPRETER_THREADS_ENV, "NPROC"):
        if os.environ.get(name, "").strip().isdigit():
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_interpreter_threads(num_threads: int) -> None:
    """Refuse up front what would deadlock: fewer CPU client threads than simulated ones + 1."""
    needed = num_threads + 1
    have = cpu_client_threads()
    if have < needed:
        raise RuntimeError(
            f"the Mosaic GPU interpreter runs {num_threads} warpgroup threads at once and XLA's "
            f"CPU thread pool has {have}: it would deadlock. Start Python with "
            f"{INTERPRETER_THREADS_ENV}={max(8, needed)} in the environment."
        )


BITS = 32  # columns per mask word
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block
# Launch order: a head's query blocks one after another (True) or the heads of a query block.
# A head's neighbouring query blocks read the same K/V tiles shifted by one block along each
# diagonal, so in this order those tiles are still in L2 when spread (per-head) slash offsets
# would otherwise fetch each from HBM (benchmarks/NOTES.md, "launch order").
Q_INNERMOST = True


def supports(dtype, head_dim: int, block_q: int, block_kv: int, stages: int = 2) -> bool:
    """Whether this kernel takes these inputs (else use the Triton kernel of sparse_flash.py):
    the shapes it was checked at on an H200, with Q and the K/V ring within Hopper's 227 KiB of
    shared memory (`in_place=False` adds a block_q x block_kv P buffer)."""
    smem = (block_q * head_dim + 2 * stages * block_kv * head_dim) * 2  # bf16/f16 bytes
    return (
        jnp.dtype(dtype) in map(jnp.dtype, SUPPORTED_DTYPES)
        and head_dim in (64, 128)
        and block_q in (64, 128)
        and block_kv in (64, 128)
        and block_q % block_kv == 0
        and stages >= 2
        and smem <= SMEM_BYTES
    )


def column_valid_words(index: SparseIndex, c_pad: int) -> jax.Array:
    """[B, Hq, n_q_blocks, c_pad // 32] int32: bit j of word w is set when column slot 32w + j
    is attended by that query block (within its count and not covered by D)."""
    columns = index.column_index
    columns = jnp.pad(columns, ((0, 0), (0, 0), (0, c_pad - columns.shape[-1])), constant_values=0)
    slots = jnp.arange(c_pad, dtype=jnp.int32)
    q_blocks = jnp.arange(index.num_q_blocks, dtype=jnp.int32)[:, None]
    valid = slots < index.column_count[..., None]  # [B, H, nqb, c_pad]
    valid &= ~column_is_covered(index, columns[:, :, None, :], q_blocks)
    bits = valid.reshape(*valid.shape[:-1], c_pad // BITS, BITS).astype(jnp.uint32)
    words = (bits << jnp.arange(BITS, dtype=jnp.uint32)).sum(axis=-1, dtype=jnp.uint32)
    return lax.bitcast_convert_type(words, jnp.int32)


def _kernel(
    diag_offset_ref,  # [B, H, max_diag]
    diag_count_ref,  # [B, H, nqb]
    block_index_ref,  # [B, H, nqb, max_blocks]
    block_count_ref,  # [B, H, nqb]
    column_tiles_ref,  # [B, H, nqb]
    column_words_ref,  # [B, H, nqb, c_pad // 32]
    q_ref,  # [B, N_pad, H, D]
    k_ref,  # [B, N_pad, Hkv, D]
    v_ref,
    k_col_ref,  # [B, H, c_pad, D]
    v_col_ref,
    *refs,  # (key_length [B] when padded,) out_ref [B, N_pad, H, D], scoped
    scale: float,
    block_kv: int,
    ratio: int,
    n_q_blocks: int,
    group: int,
    stages: int,
    compute_wgs: int,
    in_place: bool,
    padded: bool,
):
    *key_length_ref, out_ref, scoped = refs
    (qo_smem2, k_smem, v_smem, *p_smem2), (k_ready, v_ready, q_ready), (k_free, v_free), sched = (
        scoped
    )
    p_smem2 = p_smem2[0] if p_smem2 else None
    rows = ROWS_PER_WARPGROUP
    dtype = q_ref.dtype
    head_dim = q_ref.shape[-1]
    i = n_q_blocks - 1 - lax.axis_index("q")  # longest (last) query blocks are launched first
    b = lax.axis_index("batch")
    h = lax.axis_index("heads")
    wg = lax.axis_index("wg")
    last_block = (i + 1) * ratio - 1
    n_diag = diag_count_ref[b, h, i]
    n_dense = n_diag + block_count_ref[b, h, i]
    n_steps = n_dense + column_tiles_ref[b, h, i]
    words_per_tile = block_kv // BITS
    max_diag = diag_offset_ref.shape[-1]
    max_blocks = block_index_ref.shape[-1]

    def dense_key_block(t):  # the key block of dense step t < n_dense: D, then listed blocks
        diag = last_block - diag_offset_ref[b, h, jnp.minimum(t, max_diag - 1)]
        listed = block_index_ref[b, h, i, jnp.clip(t - n_diag, 0, max_blocks - 1)]
        return jnp.where(t < n_diag, diag, listed)

    def schedule_barrier():
        if compute_wgs > 1:
            plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(sched)

    @pl.when(wg < compute_wgs)
    def _consumer():
        plgpu.set_max_registers(232 if compute_wgs > 1 else 240, action="increase")
        qo_smem = qo_smem2.at[wg]
        row0 = i * (compute_wgs * rows) + wg * rows
        plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, rows), h], qo_smem, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        qk_scale = scale * LOG2E
        layout = plgpu.Layout.WGMMA
        m_i = plgpu.layout_cast(jnp.full((rows,), -jnp.inf, jnp.float32), layout.reduce(1))
        l_i = plgpu.layout_cast(jnp.full((rows,), 0.0, jnp.float32), layout.reduce(1))
        acc = plgpu.layout_cast(jnp.full((rows, head_dim), 0.0, jnp.float32), layout)
        row_ids = plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 0, layout=layout)
        lane_ids = plgpu.broadcasted_iota(jnp.int32, (rows, block_kv), 1, layout=layout)

        def causal_mask(t):
            causal = row0 + row_ids >= (last_block - t) * block_kv + lane_ids
            return causal & key_mask(t) if padded else causal

        def key_mask(t):  # keys of dense step t before the sequence's key length
            key_length = key_length_ref[0][b]
            return dense_key_block(t) * block_kv + lane_ids < key_length

        def column_mask(t):
            first_word = (t - n_dense) * words_per_tile
            word = column_words_ref[b, h, i, first_word]
            words = lane_ids * 0 + word
            for w in range(1, words_per_tile):
                word = column_words_ref[b, h, i, first_word + w]
                words = jnp.where(lane_ids >= w * BITS, word, words)
            bit = lax.shift_right_logical(words, lax.rem(lane_ids, BITS))
            return (bit & 1) != 0

        plgpu.barrier_wait(k_ready.at[0])
        pl.when(wg == 1)(schedule_barrier)

        def step(t, carry, mask_fn=None):
            acc, m_i, l_i = carry
            slot = lax.rem(t, stages)

            def compute_qk(acc_ref):
                plgpu.wgmma(acc_ref, qo_smem, k_smem.at[slot].transpose((1, 0)))
                schedule_barrier()
                return acc_ref[...]

            s = pl.run_scoped(compute_qk, plgpu.ACC((rows, block_kv), jnp.float32))
            plgpu.barrier_arrive(k_free.at[slot])
            s = s * qk_scale
            if mask_fn is not None:
                s = jnp.where(mask_fn(t), s, MASK_VALUE)
            m_new = jnp.maximum(m_i, s.max(axis=1))
            alpha = jnp.exp2(m_i - m_new)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
            acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
            l_i = l_i * alpha + p.sum(axis=1)
            p16 = p.astype(dtype)
            acc, l_i, m_new, p16 = lax.optimization_barrier((acc, l_i, m_new, p16))
            if compute_wgs > 1:
                plgpu.barrier_arrive(sched)
            plgpu.barrier_wait(v_ready.at[slot])
            if compute_wgs > 1:
                plgpu.barrier_wait(sched)

            def wait_next_k():
                @pl.when(t + 1 < n_steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(t + 1, stages)])

            if in_place:

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p16, v_smem.at[slot])
                    wait_next_k()

                acc = pl.run_state(compute_pv)(plgpu.ACC.init(acc))
            else:  # P through shared memory, into a fresh accumulator
                p_smem = p_smem2.at[wg]
                p_smem[...] = p16
                plgpu.commit_smem()

                def compute_pv(acc_ref):
                    plgpu.wgmma(acc_ref, p_smem, v_smem.at[slot])
                    wait_next_k()
                    return acc_ref[...]

                acc = acc + pl.run_scoped(compute_pv, plgpu.ACC((rows, head_dim), jnp.float32))
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_new, l_i

        carry = (acc, m_i, l_i)
        carry = lax.fori_loop(0, ratio, functools.partial(step, mask_fn=causal_mask), carry)
        dense_step = functools.partial(step, mask_fn=key_mask) if padded else step
        carry = lax.fori_loop(ratio, n_dense, dense_step, carry)
        carry = lax.fori_loop(n_dense, n_steps, functools.partial(step, mask_fn=column_mask), carry)
        acc, _, l_i = carry
        pl.when(wg == 0)(schedule_barrier)
        acc = acc / lax.broadcast_in_dim(l_i, acc.shape, [0])
        qo_smem[...] = acc.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(qo_smem, out_ref.at[b, pl.ds(row0, rows), h])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == compute_wgs)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")
        kv_head = lax.div(h, group)

        def fetch(t, src_ref, col_ref, smem, ready):
            slot = lax.rem(t, stages)

            @pl.when(t < n_dense)
            def _():
                rows_at = pl.ds(dense_key_block(t) * block_kv, block_kv)
                plgpu.copy_gmem_to_smem(
                    src_ref.at[b, rows_at, kv_head], smem.at[slot], ready.at[slot]
                )

            @pl.when(t >= n_dense)
            def _():
                rows_at = pl.ds((t - n_dense) * block_kv, block_kv)
                plgpu.copy_gmem_to_smem(col_ref.at[b, h, rows_at], smem.at[slot], ready.at[slot])

        @pl.loop(0, n_steps)
        def _(t):
            slot = lax.rem(t, stages)

            @pl.when(t >= stages)
            def _():
                plgpu.barrier_wait(k_free.at[slot])

            fetch(t, k_ref, k_col_ref, k_smem, k_ready)

            @pl.when(t >= stages)
            def _():
                plgpu.barrier_wait(v_free.at[slot])

            fetch(t, v_ref, v_col_ref, v_smem, v_ready)

        # Observe the last releases too (the interpreter checks that every barrier completion
        # was seen; on the GPU this only keeps the producer until the consumers are done).
        @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
        def _(t):
            plgpu.barrier_wait(k_free.at[lax.rem(t, stages)])
            plgpu.barrier_wait(v_free.at[lax.rem(t, stages)])


def _pad_axis(x, axis, size, value=0):
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@functools.partial(
    jax.jit,
    static_argnames=("softmax_scale", "stages", "interpret", "in_place", "poison", "q_innermost"),
)
def sparse_flash_attention_mgpu(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    index: SparseIndex,
    *,
    softmax_scale: float | None = None,
    stages: int = 2,
    interpret: bool = False,
    in_place: bool | None = None,
    poison: bool = False,
    q_innermost: bool = Q_INNERMOST,
    lengths: SeqLengths | None = None,
) -> jax.Array:
    """Sparse causal prefill attention. q [B, N, Hq, D], k/v [B, N, Hkv, D] -> [B, N, Hq, D].

    bf16/f16, head_dim 64 or 128, index blocks and stages with `supports`. Any N (padded
    here to the query block). `interpret=True` runs Mosaic GPU's interpreter (CPU). `in_place`
    (default: not interpret) accumulates PV into the running accumulator on the tensor cores with
    P from registers; the interpreter has neither form (`pl.run_state`, a wgmma operand in
    registers), so `in_place=False` stages P in shared memory and adds a fresh product.
    `poison=True` writes into a NaN-filled buffer (a mutable ref) instead of a fresh one: tests
    use it to prove every element is written. `lengths`: a right-padded batch (see
    `SeqLengths`); padding rows and rows left without a key are zero.
    """
    batch, n, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    block_q, block_kv = index.block_q, index.block_kv
    if not (q.dtype == k.dtype == v.dtype) or not supports(
        q.dtype, head_dim, block_q, block_kv, stages
    ):
        raise ValueError(
            f"the Mosaic GPU kernel takes bf16/f16, head_dim 64 or 128, block_q in (64, 128), "
            f"block_kv in (64, 128) dividing it, stages >= 2 within 227 KiB of shared memory; "
            f"got {q.dtype}/{k.dtype}/{v.dtype}, head_dim {head_dim}, blocks "
            f"{block_q}/{block_kv}, stages {stages}"
        )
    if num_heads % num_kv_heads:
        raise ValueError(f"kv heads ({num_kv_heads}) must divide query heads ({num_heads})")
    check_index_matches_inputs(index, q)
    if lengths is not None:  # columns and listed blocks past the lengths: never loaded
        index = clip_index_to_lengths(index, lengths.keys)
    if in_place is None:
        in_place = not interpret
    n_q_blocks = index.num_q_blocks
    n_pad = n_q_blocks * block_q
    scale = head_dim**-0.5 if softmax_scale is None else softmax_scale
    q_p, k_p, v_p = (_pad_axis(x, 1, n_pad) for x in (q, k, v))
    k_col = gather_columns(k, index.column_index, block_kv)
    v_col = gather_columns(v, index.column_index, block_kv)
    c_pad = k_col.shape[2]
    words = column_valid_words(index, c_pad)
    column_tiles = -(-index.column_count // block_kv)
    block_index = _pad_axis(index.block_index, 3, max(1, index.block_index.shape[3]), SENTINEL)
    compute_wgs = block_q // ROWS_PER_WARPGROUP
    if interpret:
        check_interpreter_threads(compute_wgs + 1)

    tile = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((compute_wgs, ROWS_PER_WARPGROUP, head_dim), q.dtype, transforms=tile),
        plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tile),
        plgpu.SMEM((stages, block_kv, head_dim), q.dtype, transforms=tile),
    )
    if not in_place:
        scratch += (
            plgpu.SMEM((compute_wgs, ROWS_PER_WARPGROUP, block_kv), q.dtype, transforms=tile),
        )
    kernel = functools.partial(
        _kernel,
        scale=scale,
        block_kv=block_kv,
        ratio=block_q // block_kv,
        n_q_blocks=n_q_blocks,
        group=num_heads // num_kv_heads,
        stages=stages,
        compute_wgs=compute_wgs,
        in_place=in_place,
        padded=lengths is not None,
    )

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            scratch,
            (
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=stages),
                plgpu.Barrier(num_barriers=compute_wgs),
            ),
            (plgpu.Barrier(num_arrivals=compute_wgs, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=compute_wgs),
            collective_axes="wg",
        )

    inputs = (
        index.diag_offset,
        index.diag_count,
        block_index,
        index.block_count,
        column_tiles,
        words,
        q_p,
        k_p,
        v_p,
        k_col,
        v_col,
    ) + (() if lengths is None else (lengths.keys.astype(jnp.int32),))
    launch = functools.partial(
        plgpu.kernel,
        entry,
        # The last grid axis varies fastest in launch order.
        grid=(batch, num_heads, n_q_blocks) if q_innermost else (n_q_blocks, batch, num_heads),
        grid_names=("batch", "heads", "q") if q_innermost else ("q", "batch", "heads"),
        num_threads=compute_wgs + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=plgpu.InterpretGPUParams() if interpret else None,
    )
    if poison:  # the output ref comes last either way: an input ref here, the output otherwise
        out_ref = jax.new_ref(jnp.full(q_p.shape, jnp.nan, q.dtype))
        launch(out_type=())(*inputs, out_ref)
        out = out_ref[...]
    else:
        out = launch(out_type=jax.ShapeDtypeStruct(q_p.shape, q.dtype))(*inputs)
    out = out[:, :n]
    return out if lengths is None else zero_unattended_rows(out, index, lengths)
