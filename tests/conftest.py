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


# MINFERENCE_JAX_TEST_GPU_PLUGIN=1 makes a CPU-only machine run the suite as a GPU machine would
# (what tests/test_gpu_phase.py checks of this file).
GPU_PLUGIN = os.environ.get("MINFERENCE_JAX_TEST_GPU_PLUGIN") == "1" or (
    _accelerator_plugin_installed()
)
IN_WORKER = "PYTEST_XDIST_WORKER" in os.environ
# Where a GPU plugin is installed, pytest-xdist's workers run JAX on the CPU, as on a CPU-only
# machine, and leave the tests marked gpu to one process of their own started after them
# (pytest_sessionfinish): each JAX process on the card keeps most of its memory.
CPU_WORKER = GPU_PLUGIN and IN_WORKER
if CPU_WORKER:
    os.environ["JAX_PLATFORMS"] = "cpu"

# On the CPU, XLA's LLVM backend without optimisation: the tests' programs are small, so
# compiling them is most of the suite's time (about a fifth less in all); what they compute is
# the same HLO. Inherited by the subprocesses the tests start (add to it there, never replace
# it). Left alone where JAX runs on a GPU (the GPU tests time real kernels).
CPU_FAST_COMPILE = "--xla_backend_optimization_level=0"
if (not GPU_PLUGIN or CPU_WORKER) and CPU_FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FAST_COMPILE}".strip()

import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

if CPU_WORKER:  # also where something imported jax before this file set JAX_PLATFORMS
    jax.config.update("jax_platforms", "cpu")

GPU_AFTER_WORKERS = (
    "GPU plugin installed: tests marked gpu run after the others, in one process of their own; "
    "the others on pytest-xdist workers with JAX on the CPU"
)


def _workers_requested(config) -> bool:
    return config.getoption("dist", "no") != "no" and bool(config.getoption("numprocesses", 0))


def pytest_configure(config):
    """Where a GPU plugin is installed and pytest-xdist starts workers, the tests marked gpu run
    after the workers are done, in one process (`gpu_phase_args`), never beside them.

    With workers on the card, each is its own JAX process and keeps what its largest test
    allocated until it ends: two f32 kernel tests on an H200 ran out of memory beside the other
    workers' pools. The in-suite alternatives are not safe: a memory fraction per worker (0.9 /
    16 workers) caps every test below what the 1M-token GPU tests need, and `--dist loadgroup`,
    which would keep the GPU tests on one worker, silently stops grouping under pytest 9.2
    (https://github.com/pytest-dev/pytest-xdist/issues/1386). `-n 0` runs everything in this
    one process, on the GPU.
    """
    config.gpu_tests_after_workers = GPU_PLUGIN and not IN_WORKER and _workers_requested(config)


def pytest_report_header(config):
    return GPU_AFTER_WORKERS if getattr(config, "gpu_tests_after_workers", False) else None


def gpu_phase_args(invocation_args, markexpr: str) -> list[str]:
    """pytest arguments of the process that runs the tests marked gpu: the same selection as
    this run, in one process (later options win)."""
    marker = f"gpu and ({markexpr})" if markexpr else "gpu"
    return [*invocation_args, "-n", "0", "-m", marker]


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    config = session.config
    if not getattr(config, "gpu_tests_after_workers", False):
        return
    reporter = config.pluginmanager.getplugin("terminalreporter")
    if exitstatus not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        reporter.ensure_newline()
        reporter.write_line("tests marked gpu not run: the other tests did not pass")
        return
    args = gpu_phase_args(config.invocation_params.args, config.option.markexpr)
    reporter.ensure_newline()
    reporter.write_line(f"tests marked gpu, one process: pytest {' '.join(args)}")
    capture = config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        code = subprocess.run(
            [sys.executable, "-m", "pytest", *args], cwd=config.invocation_params.dir
        ).returncode
    if code != pytest.ExitCode.NO_TESTS_COLLECTED:  # else the workers' status stands
        session.exitstatus = code


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def pytest_collection_modifyitems(config, items):
    if CPU_WORKER:  # the tests marked gpu run after the workers (pytest_sessionfinish)
        gpu = [item for item in items if "gpu" in item.keywords]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if "gpu" not in item.keywords]
        return
    if _has_gpu():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
