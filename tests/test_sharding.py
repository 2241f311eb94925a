"""Tensor-parallel prefill equals single-device prefill (CPU devices; GPU runs: benchmarks)."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
WORKER = str(ROOT / "tests" / "sharding_worker.py")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("devices", [2, 4])
def test_sharded_prefill_matches_single_device(devices):
    out = subprocess.run(
        [sys.executable, WORKER, "local", str(devices)],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == devices
    assert report["dense"] <= 1e-5 and report["minference"] <= 1e-5


def test_device_count_must_divide_kv_heads():
    from minference_jax.models import ModelConfig
    from minference_jax.models.sharding import check_divisible

    config = ModelConfig.from_hf_dict(
        dict(
            model_type="llama",
            vocab_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    check_divisible(config, 2)
    with pytest.raises(ValueError, match="divide the kv heads \\(2\\)"):
        check_divisible(config, 4)


def test_two_processes_with_jax_distributed():
    """Multi-host path: 2 local processes, 1 CPU device each, gloo collectives."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "host", str(pid), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for pid in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["devices"] == 2
        assert report["dense"] <= 1e-5 and report["minference"] <= 1e-5


def test_cli_tensor_parallel_over_local_devices():
    env = {
        **_env(),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "minference_jax.prefill",
            "--tensor-parallel",
            "0",
            "--json",
            "--quiet",
            "--max-new-tokens",
            "2",
            "--model",  # the embedded default has one kv head: nothing to split
            str(ROOT / "tests" / "fixtures" / "hf" / "llama"),
            "--synthetic-tokens",
            "200",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["devices"] == 2
