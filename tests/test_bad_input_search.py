"""Bad input to `python -m minference_jax.search`: exit code 2, one line on stderr, no traceback,
checked before the search starts, and an existing --out file byte-identical afterwards."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from minference_jax.models.defaults import PASSKEY_TINY as CHECKPOINT
from minference_jax.search import main

ROOT = pathlib.Path(__file__).parent.parent
LLAMA = str(ROOT / "tests" / "fixtures" / "hf" / "llama")  # no tokenizer, 256 positions
EXISTING = b'[{"0": ["stream_llm", 1, 2, 0.5]}]'  # an earlier config the search must not touch
FAST = ["--synthetic-tokens", "100", "--num-prompts", "1", "--score-queries", "16"]


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("error: ") and "Traceback" not in err
    assert message in err, err


@pytest.fixture
def out(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(EXISTING)
    return path


def run_main(capsys, argv) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def assert_untouched(out: pathlib.Path) -> None:
    assert out.read_bytes() == EXISTING
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--score-queries", "0"], "--score-queries must be >= 1, got 0"),
        (["--num-prompts", "0"], "--num-prompts must be >= 1, got 0"),
        (["--synthetic-tokens", "0"], "--synthetic-tokens must be >= 1"),
        (["--seed", "-1"], "--seed must be >= 0"),
        (["--min-recall", "1.5"], "--min-recall must be in [0, 1], got 1.5"),
        (["--min-recall=-0.1"], "--min-recall must be in [0, 1], got -0.1"),
        (["--min-recall", "nan"], "--min-recall must be in [0, 1], got nan"),
        (["--synthetic-tokens", "50", "--score-queries", "64"], "exceeds the prompt length"),
        (["--candidates", "block:4,32"], "bad candidate 'block:4,32'"),
        (["--candidates", "vs:1000"], "bad candidate 'vs:1000'"),
        (["--candidates", "dense:1"], "bad candidate 'dense:1'"),
        (["--candidates", "block:0"], "top_k must be >= 1"),
        (["--candidates", "vs:1,99999999999"], "sizes must be in [0, 2147483647]"),
        (["--num-prompts", "x"], "invalid int value"),
        (["--prompt-file", "/no/such/prompt.txt"], "cannot read prompt file"),
    ],
)
def test_bad_arguments_leave_the_old_config(capsys, out, argv, message):
    code, err = run_main(capsys, ["--model", LLAMA, "--out", str(out), *argv])
    assert_one_line_error(code, err, message)
    assert_untouched(out)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b" \n\t", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "holds NUL bytes"),
        (b"caf\xe9", "is not UTF-8 text"),
        (b"short text", "has 10 tokens, fewer than --score-queries (64)"),
    ],
)
def test_bad_prompt_files(capsys, out, tmp_path, content, message):
    prompt = tmp_path / "prompt.txt"
    prompt.write_bytes(content)
    argv = ["--model", str(CHECKPOINT), "--out", str(out), "--prompt-file", str(prompt)]
    assert_one_line_error(*run_main(capsys, argv), message)
    assert_untouched(out)


def test_prompt_file_needs_a_tokenizer(capsys, out, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("text " * 40)
    argv = ["--model", LLAMA, "--out", str(out), "--prompt-file", str(prompt)]
    assert_one_line_error(*run_main(capsys, argv), "no tokenizer.json")
    assert_untouched(out)


def test_unwritable_out_is_refused_before_the_search(capsys, out, tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    cases = [
        (str(tmp_path), "is a directory"),
        (str(tmp_path / "missing" / "c.json"), "does not exist"),
        (str(a_file / "c.json"), "is not a folder"),
    ]
    for target, message in cases:
        code, err = run_main(capsys, ["--model", "/no/such/model", "--out", target, *FAST])
        assert_one_line_error(code, err, message)  # before the model is even looked at
    monkeypatch.setattr(os, "access", lambda *_: False)  # as a non-root user in a 0o555 folder
    code, err = run_main(capsys, ["--model", LLAMA, "--out", str(out), *FAST])
    assert_one_line_error(code, err, "is not writable")
    assert_untouched(out)


def test_missing_model(capsys, out):
    code, err = run_main(capsys, ["--model", "/no/such/model", "--out", str(out), *FAST])
    assert_one_line_error(code, err, "checkpoint folder not found")
    assert_untouched(out)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--min-recall", "nan"], "--min-recall must be in [0, 1]"),
        (["--candidates", "block:4,32"], "bad candidate"),
    ],
)
def test_process_exit_code_and_one_line(out, argv, message):
    result = subprocess.run(
        [sys.executable, "-m", "minference_jax.search", "--model", LLAMA, "--out", str(out), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")},
    )
    assert_one_line_error(result.returncode, result.stderr, message)
    assert result.stdout == ""
    assert_untouched(out)


def test_search_api_checks_its_arguments():
    from convert.checkpoint import load_hf
    from minference_jax.search import search_patterns

    model, _ = load_hf(LLAMA)
    prompt = [np.zeros(100, np.int32)]
    with pytest.raises(ValueError, match="no prompts"):
        search_patterns(model, [])
    with pytest.raises(ValueError, match="score_queries must be >= 1, got 0"):
        search_patterns(model, prompt, score_queries=0)
    with pytest.raises(ValueError, match="min_recall must be in \\[0, 1\\], got nan"):
        search_patterns(model, prompt, min_recall=float("nan"))
