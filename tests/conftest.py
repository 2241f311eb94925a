import importlib.metadata
import importlib.util
import os

# Every index build checks that no estimated diagonal offset is dropped by a capacity bound
# (minference_jax.sparse_index.CHECK_CAPACITY); set before minference_jax is imported.
os.environ.setdefault("MINFERENCE_JAX_CHECK_CAPACITY", "1")
# The Mosaic GPU interpreter needs a CPU client thread per simulated warpgroup, all at once
# (pallas_kernels.sparse_flash_mgpu.check_interpreter_threads); a 2-core machine has 2.
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))
# Under pytest-xdist every worker is its own JAX process: on a GPU each would preallocate most
# of the card for itself, and the later workers run out of memory. Allocate on demand instead.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def _accelerator_plugin_installed() -> bool:
    """A PJRT plugin (CUDA, ROCm, TPU) that JAX would load is installed."""
    return bool(importlib.metadata.entry_points(group="jax_plugins")) or (
        importlib.util.find_spec("jax_plugins") is not None
    )


# On CPU-only machines, XLA's LLVM backend without optimisation: the tests' programs are small,
# so compiling them is most of the suite's time (about a fifth less in all); what they compute
# is the same HLO. Inherited by the subprocesses the tests start (add to it there, never
# replace it). Left alone where a GPU plugin is installed (the GPU suite times real kernels).
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0"
if not _accelerator_plugin_installed() and CPU_FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
