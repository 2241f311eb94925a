"""On a GPU machine the suite runs the tests marked gpu after the others, in one process of
their own (tests/conftest.py); checked here on a CPU machine made to act as one."""

import os
import pathlib
import subprocess
import sys

from tests.conftest import gpu_phase_args

ROOT = pathlib.Path(__file__).parent.parent
KERNEL_TESTS = "tests/test_sampled_scores_kernel.py"


def test_gpu_phase_keeps_the_selection_in_one_process():
    args = gpu_phase_args(["-q", "tests/x.py", "-n", "4", "-k", "fast"], "not slow")
    assert args[:5] == ["-q", "tests/x.py", "-n", "4", "-k"]
    assert args[-4:] == ["-n", "0", "-m", "gpu and (not slow)"]  # later options win
    assert gpu_phase_args([], "")[-2:] == ["-m", "gpu"]


def _run_as_gpu_machine(*args):
    # A fresh run: not one of this run's workers (pytest-xdist marks them by environment).
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST_")}
    env["MINFERENCE_JAX_TEST_GPU_PLUGIN"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_gpu_tests_run_after_the_workers_in_their_own_process():
    cpu_test = f"{KERNEL_TESTS}::test_kernel_refuses_rows_it_cannot_tile"
    gpu_test = f"{KERNEL_TESTS}::test_fused_scores_on_gpu_equal_the_xla_path"
    result = _run_as_gpu_machine("-n", "2", cpu_test, gpu_test)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "tests marked gpu run after the others" in out  # the report header
    workers, _, gpu_phase = out.partition("tests marked gpu, one process: pytest")
    assert "2 workers [1 item]" in workers  # the workers leave the 2 gpu cases
    # The second process runs only them (skipped here: no GPU); the workers' summary comes last.
    assert "2 skipped, 1 deselected" in gpu_phase and "1 passed" in gpu_phase.splitlines()[-1]


def test_without_gpu_tests_the_workers_status_stands():
    cpu_test = f"{KERNEL_TESTS}::test_kernel_refuses_rows_it_cannot_tile"
    # The second process collects nothing (exit code 5): the run passes as the workers did.
    result = _run_as_gpu_machine("-n", "2", cpu_test)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "tests marked gpu, one process" in result.stdout
