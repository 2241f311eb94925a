"""The prefill CLI on CPU: every mode, --json, and clear errors without tracebacks."""

import json
import pathlib
import subprocess
import sys

import pytest

from minference_jax.config_io import shipped_configs
from minference_jax.prefill import main

ROOT = pathlib.Path(__file__).parent.parent
LLAMA = str(ROOT / "tests" / "fixtures" / "hf" / "llama")


def _json_run(capsys, *argv):
    assert main([*argv, "--json", "--quiet"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "mode, budget",
    [("dense", None), ("minference", "30,60"), ("a-shape", "16,64"), ("block-sparse", "2")],
)
def test_every_mode_runs_on_a_checkpoint(capsys, mode, budget):
    argv = ["--model", LLAMA, "--synthetic-tokens", "200", "--mode", mode, "--max-new-tokens", "3"]
    report = _json_run(capsys, *argv, *(["--budget", budget] if budget else []))
    assert report["mode"] == mode and report["prompt_tokens"] == 200
    assert len(report["continuation_tokens"]) == 3 and report["prefill_seconds"] > 0


def test_embedded_default_with_a_text_prompt(capsys):
    report = _json_run(capsys, "--prompt", "hello " * 50, "--max-new-tokens", "2", "--warmup")
    assert report["prompt_tokens"] == 300 and isinstance(report["continuation"], str)
    assert report["includes_compile"] is False


@pytest.mark.parametrize("mode", ["dense", "minference"])
def test_embedded_default_finds_the_passkey(capsys, mode):
    report = _json_run(capsys, "--mode", mode, "--max-new-tokens", "5")
    assert report["prompt_tokens"] == 2048
    assert report["continuation"] == "71432"
    if mode == "minference":
        assert report["patterns"] == "passkey_tiny_searched"


def test_prompt_file_and_stdin(tmp_path, capsys, monkeypatch):
    import io

    path = tmp_path / "p.txt"
    path.write_text("a prompt from a file " * 10)
    assert (
        _json_run(capsys, "--prompt-file", str(path), "--max-new-tokens", "1")["prompt_tokens"]
        == 210
    )
    monkeypatch.setattr(sys, "stdin", io.StringIO("from stdin"))
    assert _json_run(capsys, "--prompt-file", "-", "--max-new-tokens", "1")["prompt_tokens"] == 10


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "/no/such/folder"], "checkpoint folder not found"),
        (["--model", LLAMA, "--synthetic-tokens", "300"], "max_position_embeddings is 256"),
        (["--prompt", "   "], "empty prompt"),
        (["--model", LLAMA, "--prompt", "hi"], "no tokenizer.json"),
        (
            [
                "--model",
                LLAMA,
                "--synthetic-tokens",
                "50",
                "--pattern-config",
                str(shipped_configs()["Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern"]),
            ],
            "32 layers x 32 heads, the model has 2 layers x 4 query heads",
        ),
        (["--mode", "a-shape", "--budget", "1,2,3"], "bad --budget"),
    ],
)
def test_bad_input_gives_clear_error(capsys, argv, message):
    assert main([*argv, "--quiet"]) == 2
    assert message in capsys.readouterr().err


def test_cli_process_exit_codes_and_no_traceback():
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "minference_jax.prefill",
            "--max-new-tokens",
            "1",
            "--json",
            "--quiet",
            "--prompt",
            "short prompt",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": ""},
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["prompt_tokens"] == 12
    for argv in (["--mode", "sparse"], ["--model", "/missing"]):
        bad = subprocess.run(
            [sys.executable, "-m", "minference_jax.prefill", *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={"JAX_PLATFORMS": "cpu", "PATH": ""},
        )
        assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.strip()


def test_tensor_parallel_flag_reports_clear_error_on_one_device(capsys):
    assert main(["--tensor-parallel", "2", "--quiet", "--max-new-tokens", "1"]) == 2
    assert "asked for 2 devices, 1 are visible" in capsys.readouterr().err
