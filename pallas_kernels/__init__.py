"""Pallas GPU kernels (Triton lowering: A100 and H100)."""

import warnings

# jax 0.11 deprecates this backend; it is still the only Pallas path on A100, so we pin jax.
warnings.filterwarnings(
    "ignore", message="The Pallas Triton backend is deprecated", category=DeprecationWarning
)
