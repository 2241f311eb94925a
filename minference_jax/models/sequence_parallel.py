"""Sequence-parallel helpers of the tensor-parallel decoder layer (`modeling.layer_body`).

Between attention and MLP each device keeps a share of the prompt's tokens. The layout cuts the
prompt into slices of up to `chunk` tokens and gives every device the same number of rows of
each slice, so one all-gather per slice assembles it on every device (for the column-parallel
projections) and one reduce-scatter per slice sums the row-parallel outputs and hands each
device its rows back. `pipelined` issues the next slice's gather and the previous slice's
scatter beside the current slice's matmuls, so that the collectives can overlap them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def sequence_layout(seq_len: int, devices: int, chunk: int) -> tuple[int, int]:
    """(rows, steps) of the sequence-parallel token layout: the prompt is cut into `steps`
    slices of `devices * rows` tokens (padded at the end), and device d holds rows
    [d * rows, (d + 1) * rows) of every slice. An all-gather of one step's rows from every
    device gives one contiguous slice of the prompt, and a reduce-scatter of a slice's rows
    hands each device its own rows back; slices are at most `chunk` tokens."""
    rows = max(1, min(chunk // devices, -(-seq_len // devices)))
    return rows, -(-seq_len // (rows * devices))


def pipelined(fetch, compute, send, steps: int):
    """[send(compute(fetch(i))) for i in range(steps)] stacked on a leading axis, with fetch(i + 1)
    and send(i - 1) issued beside compute(i): their collectives can overlap its matmuls."""
    stack = functools.partial(jax.tree.map, lambda *ys: jnp.stack(ys))
    if steps == 1:
        return stack(send(compute(fetch(0))))

    def body(carry, i):
        current, previous = carry
        following, done = fetch(i + 1), send(previous)
        return (following, compute(current)), done

    first = fetch(0)
    second = fetch(1)
    (last, before_last), middle = jax.lax.scan(
        body, (second, compute(first)), jnp.arange(1, steps - 1)
    )
    tail = stack(send(before_last), send(compute(last)))
    return jax.tree.map(lambda m, t: jnp.concatenate([m, t]), middle, tail)


def steps_to_tokens(y):
    """[steps, B, rows, ...] -> [B, steps * rows, ...]."""
    return jnp.moveaxis(y, 0, 1).reshape(y.shape[1], -1, *y.shape[3:])
