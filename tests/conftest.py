import importlib.metadata
import importlib.util
import os

# Every index build checks that no estimated diagonal offset is dropped by a capacity bound
# (minference_jax.sparse_index.CHECK_CAPACITY); set before minference_jax is imported.
os.environ.setdefault("MINFERENCE_JAX_CHECK_CAPACITY", "1")
# The Mosaic GPU interpreter needs a CPU client thread per simulated warpgroup, all at once
# (pallas_kernels.sparse_flash_mgpu.check_interpreter_threads); a 2-core machine has 2.
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))


def _accelerator_plugin_installed() -> bool:
    """A PJRT plugin (CUDA, ROCm, TPU) that JAX would load is installed (no backend started)."""
    return bool(importlib.metadata.entry_points(group="jax_plugins")) or (
        importlib.util.find_spec("jax_plugins") is not None
    )


GPU_PLUGIN = _accelerator_plugin_installed()

# On CPU-only machines, XLA's LLVM backend without optimisation: the tests' programs are small,
# so compiling them is most of the suite's time (about a fifth less in all); what they compute
# is the same HLO. Inherited by the subprocesses the tests start (add to it there, never
# replace it). Left alone where a GPU plugin is installed (the GPU suite times real kernels).
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0"
if not GPU_PLUGIN and CPU_FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FAST_COMPILE}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

SERIAL_ON_GPU = "GPU plugin installed: all tests in one process, no pytest-xdist workers"


def pytest_configure(config):
    """Where a GPU plugin is installed, run the whole suite in this one process, as `-n 0` does.

    With pytest-xdist workers, each is its own JAX process on the same card, and JAX keeps what
    a process's largest test allocated until the process ends: two f32 kernel tests on an H200
    ran out of memory beside the other workers' pools. The alternatives are not safe: a memory
    fraction per worker (0.9 / 16 workers) caps every test below what the 1M-token GPU tests
    need, and `--dist loadgroup`, which would keep the GPU tests on one worker, silently stops
    grouping under pytest 9.2 (https://github.com/pytest-dev/pytest-xdist/issues/1386). This
    runs before xdist's own configure (trylast there), so no worker starts. CPU-only machines
    keep the workers.
    """
    if GPU_PLUGIN and config.getoption("dist", "no") != "no":
        config.option.numprocesses = 0
        config.option.dist = "no"
        config.option.tx = []


def pytest_report_header(config):
    return SERIAL_ON_GPU if GPU_PLUGIN else None


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
