import os

# Every index build checks that no estimated diagonal offset is dropped by a capacity bound
# (minference_jax.sparse_index.CHECK_CAPACITY); set before minference_jax is imported.
os.environ.setdefault("MINFERENCE_JAX_CHECK_CAPACITY", "1")
# The Mosaic GPU interpreter needs a CPU client thread per simulated warpgroup, all at once
# (pallas_kernels.sparse_flash_mgpu.check_interpreter_threads); a 2-core machine has 2.
os.environ.setdefault("PJRT_NPROC", str(max(8, os.cpu_count() or 1)))

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
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run through the device tool)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
