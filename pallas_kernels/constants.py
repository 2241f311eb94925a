"""Numeric constants the Pallas kernels share (no imports from the package: no cycles)."""

import math

import jax.numpy as jnp

# Kernels take exp2 with the scale folded in: exp(x) = exp2(x * LOG2E).
LOG2E = math.log2(math.e)
# Finite mask value: a fully masked tile row gets max = MASK_VALUE and p = exp2(0) only where
# it is then zeroed or wiped by a later correction factor, never inf - inf = NaN.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
