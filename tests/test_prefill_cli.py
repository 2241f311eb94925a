"""The prefill CLI on CPU: every mode, what attention really ran, the report in words, --help."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from minference_jax import patterns as P
from minference_jax.config_io import save_pattern_config
from minference_jax.models.defaults import PASSKEY_TINY, default_prompt
from minference_jax.prefill import _answer, _passkey, build_parser, describe, main

ROOT = pathlib.Path(__file__).parent.parent
LLAMA = str(ROOT / "tests" / "fixtures" / "hf" / "llama")
# A GPU prefill of at most DENSE_CROSSOVER_TOKENS runs dense cuDNN whatever the patterns: there
# the report must say so; elsewhere these short prompts run the sparse path.
SHORT_PROMPTS_RUN_DENSE = jax.default_backend() == "gpu"
# The tests' checkpoints are float32: dense layers run XLA (cuDNN takes 16-bit inputs only).
DENSE_LAYER = {"families": ["dense"], "computed_fraction": 1.0, "backend": "xla-dense"}


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
    assert report["includes_compile"] is False and report["compile_seconds"] is not None


def _tiny_config(path):
    """A mixed per-head config for passkey-tiny (2 layers x 4 heads), tiny budgets."""
    layer = (P.VerticalSlash(30, 50), P.AShape(16, 64), P.BlockSparse(2), P.VerticalSlash(0, 0))
    save_pattern_config(P.HeadPatterns((layer, layer[::-1])), path)
    return str(path)


@pytest.mark.parametrize(
    "mode_args, families",
    [
        (["--mode", "minference", "--budget", "30,50"], {"vertical-slash"}),
        (["--mode", "a-shape", "--budget", "16,64"], {"a-shape"}),
        (["--mode", "block-sparse", "--budget", "2"], {"block-sparse"}),
        (["--mode", "sampled-blocks", "--budget", "0.3,4"], {"sampled-blocks"}),
        (["--pattern-config", "CONFIG"], {"vertical-slash", "a-shape", "block-sparse"}),
    ],
)
def test_tiny_budget_is_sparse_and_changes_the_logits(capsys, tmp_path, mode_args, families):
    """The report comes from the index each layer built: a CLI running dense whatever --mode
    says would show 100% of the tiles and the dense logits."""
    mode_args = [_tiny_config(tmp_path / "c.json") if a == "CONFIG" else a for a in mode_args]
    argv = ["--model", str(PASSKEY_TINY), "--synthetic-tokens", "500", "--max-new-tokens", "0"]
    report = _json_run(capsys, *argv, "--repeats", "0", *mode_args, "--compare-dense")
    assert len(report["layers"]) == 2
    if SHORT_PROMPTS_RUN_DENSE:
        assert report["layers"] == [DENSE_LAYER] * 2
        return
    for layer in report["layers"]:
        assert set(layer["families"]) == families
        assert 0 < layer["computed_fraction"] < 0.9
        assert layer["backend"] == "xla"  # the CPU's sparse path
    assert report["dense"]["last_logits_max_abs_diff"] > 1e-3
    assert report["continuation_tokens"] == [] and report["includes_compile"] is True


def test_dense_mode_reports_every_tile(capsys):
    report = _json_run(capsys, "--model", LLAMA, "--synthetic-tokens", "100", "--mode", "dense")
    assert report["layers"] == [DENSE_LAYER] * 2


def test_embedded_default_explains_itself(capsys):
    """Pass key found by the sparse and the dense prefill, compile separated from timed runs,
    per-layer progress shows each layer's own time."""
    argv = ["--max-new-tokens", "5", "--repeats", "2", "--compare-dense", "--json"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["prompt_tokens"] == 2048 and report["patterns"] == "pytext_12m_searched"
    assert report["model"].startswith("embedded pytext-12m")
    assert report["continuation"] == "71432"
    assert report["passkey"] == {"expected": "71432", "retrieved": True}
    assert report["dense"]["passkey"] == {"expected": "71432", "retrieved": True}
    assert report["includes_compile"] is False and report["repeats"] == 2
    if not SHORT_PROMPTS_RUN_DENSE:
        fractions = [layer["computed_fraction"] for layer in report["layers"]]
        assert max(fractions) < 1.0 and np.mean(fractions) < 0.8  # the searched config ran
    progress = captured.err.splitlines()
    assert progress[0] == "minference: compiling for 2048 tokens (first run, not timed)"
    assert "minference: timed run 2/2" in progress and "dense: timed run 2/2" in progress
    # Layers 1-3 of the searched config are vertical-slash only: widths shared, one program.
    compile_layer_times = [float(line.split()[-2]) for line in progress[1:3]]
    assert compile_layer_times[1] < compile_layer_times[0] / 4  # layer 2 reuses layer 1's
    text = describe(report)
    assert "pass key 71432 retrieved" in text and "median of 2 timed runs" in text
    assert re.search(r"layer 1: [a-z-]+, computed \d+\.\d% of the causal key tiles, on \w", text)
    assert "first run, not timed" in text and re.search(r"\dx (faster|slower) than dense", text)
    # Peak memory is reported on every backend: the host's always, the device's where known.
    assert 2**20 < report["peak_host_memory_bytes"] < 2**40
    assert re.search(r"peak host memory: \d+\.\d\d GiB \(this process's largest", text)
    assert ("peak device memory" in text) == (report["peak_device_memory_bytes"] is not None)


def test_passkey_verdicts():
    text = default_prompt()
    assert _passkey(text, " 71432 and more", 8) == {"expected": "71432", "retrieved": True}
    assert _passkey(text, "7143", 8) == {"expected": "71432", "retrieved": False}
    # Two new tokens cannot show a 5-digit key: the verdict is unknown, not "not retrieved".
    assert _passkey(text, "71", 2) == {"expected": "71432", "retrieved": None}
    assert _passkey("The pass key is 123. Remember it. 124 is the pass key.", "123", 8) is None
    assert _passkey(None, "123", 8) is None
    assert "too few new tokens" in _answer("71", {"expected": "71432", "retrieved": None})
    assert _answer("7143", _passkey(text, "7143", 8)).endswith("pass key 71432 NOT retrieved")


def test_text_prompt_and_zero_new_tokens(capsys):
    report = _json_run(
        capsys, "--prompt", "hello " * 50, "--max-new-tokens", "0", "--mode", "dense"
    )
    assert report["prompt_tokens"] == 300 and report["continuation_tokens"] == []
    assert report["continuation"] == "" and report["passkey"] is None


def test_prompt_file_and_stdin(tmp_path, capsys, monkeypatch):
    import io

    path = tmp_path / "p.txt"
    path.write_text("a prompt from a file " * 10)
    argv = ["--max-new-tokens", "1", "--mode", "dense"]
    assert _json_run(capsys, "--prompt-file", str(path), *argv)["prompt_tokens"] == 210
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("from stdin é".encode())))
    assert _json_run(capsys, "--prompt-file", "-", *argv)["prompt_tokens"] == 13


def test_warnings_dense_in_disguise_and_past_max_positions(capsys):
    # a-shape 64 + 64 >= 100 tokens: every key is kept; 100 + 200 > 256 positions.
    argv = ["--model", LLAMA, "--synthetic-tokens", "100", "--mode", "a-shape", "--budget"]
    assert main([*argv, "64,64", "--max-new-tokens", "200", "--repeats", "0", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "8 of 8 sparse heads have a budget covering the whole 100-token prompt" in err
    assert "run past the model's max_position_embeddings (256)" in err


@pytest.mark.parametrize("module", ["prefill", "search"])
def test_every_help_entry_has_a_text_and_its_default(module):
    import importlib

    parser = importlib.import_module(f"minference_jax.{module}").build_parser()
    for action in parser._actions:
        if action.dest == "help":
            continue
        assert action.help, action.dest
        help_text = parser._get_formatter()._get_help_string(action)
        assert action.required or "default" in help_text, (action.dest, help_text)
    assert "(default: 8192)" in " ".join(build_parser().format_help().split())


def test_cli_process_exit_codes_and_no_traceback():
    env = {"JAX_PLATFORMS": "cpu", "PATH": ""}
    argv = ["--max-new-tokens", "1", "--json", "--quiet", "--prompt", "short prompt"]
    ok = subprocess.run(
        [sys.executable, "-m", "minference_jax.prefill", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["prompt_tokens"] == 12


def test_tensor_parallel_flag_reports_clear_error_on_one_device(capsys):
    assert main(["--tensor-parallel", "2", "--quiet", "--max-new-tokens", "1"]) == 2
    assert "asked for 2 devices, 1 are visible" in capsys.readouterr().err
