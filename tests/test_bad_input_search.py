"""Bad input to `python -m minference_jax.search`: exit code 2, one line on stderr, no traceback,
checked before the search starts, and an existing --out file byte-identical afterwards."""

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minference_jax import patterns as P
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
        (["--synthetic-tokens", "100000000000"], "int32 position range"),
        (["--synthetic-tokens", "2000000000"], "GiB (weights and KV cache)"),
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


def test_tokenizer_with_ids_past_vocab_size_is_refused(capsys, out, tmp_path, monkeypatch):
    from minference_jax.models import checkpoint

    load_model = checkpoint.load_model

    def smaller_vocab(folder, *args, **kwargs):  # the byte tokenizer produces ids up to 255
        model, config = load_model(folder, *args, **kwargs)
        return model, dataclasses.replace(config, vocab_size=200)

    monkeypatch.setattr(checkpoint, "load_model", smaller_vocab)
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("text " * 40)
    argv = ["--model", str(CHECKPOINT), "--out", str(out), "--prompt-file", str(prompt)]
    message = "token ids up to 255, but the model's vocab_size"
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


def test_out_naming_the_prompt_file_is_refused(capsys, tmp_path):
    prompt = tmp_path / "p.py"
    prompt.write_text("text " * 40)
    (tmp_path / "sub").mkdir()
    (tmp_path / "link.py").symlink_to(prompt)
    os.link(prompt, tmp_path / "hard.py")
    for target in ("p.py", "sub/../p.py", "link.py", "hard.py"):
        out = str(tmp_path / target)
        argv = ["--model", LLAMA, "--out", out, "--prompt-file", str(prompt), "--quiet"]
        assert_one_line_error(*run_main(capsys, argv), f"--out {out} is the prompt file")
        assert prompt.read_text() == "text " * 40


def _files(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_out_inside_the_checkpoint_folder_is_refused(capsys, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(LLAMA, model)  # a copy: the unfixed search would overwrite its files
    before = _files(model)
    (tmp_path / "model_link").symlink_to(model)
    (tmp_path / "out_link.json").symlink_to(model / "config.json")
    cases = [
        (model, model / "config.json"),
        (model, model / "new.json"),
        (model, model),
        (model, tmp_path / "model_link" / "config.json"),
        (model, tmp_path / "out_link.json"),
        (tmp_path / "model_link", model / "config.json"),
    ]
    for model_arg, out in cases:
        argv = ["--model", str(model_arg), "--out", str(out), *FAST]
        code, err = run_main(capsys, argv)
        assert_one_line_error(code, err, f"--out {out} is inside the checkpoint folder {model_arg}")
    assert _files(model) == before
    assert [p.name for p in model.iterdir() if p.name.endswith(".tmp")] == []


def test_candidates_that_cannot_share_a_layer_are_refused(capsys, out):
    argv = ["--model", LLAMA, "--out", str(out), *FAST, "--candidates"]
    code, err = run_main(capsys, [*argv, "adb:0.95,8", "adbr:0.2,8", "adb:0.5,32"])
    assert_one_line_error(
        code,
        err,
        "--candidates: the candidates cannot share one layer: adaptive heads of one layer must "
        "share the rule and the stride; got rules ['cumulative', 'relative'], strides [8, 32]",
    )
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
    mixed = [P.AntiDiagonalBlockSparse(stride=8), P.AntiDiagonalBlockSparse(stride=16)]
    with pytest.raises(ValueError, match="candidates cannot share one layer: .* strides"):
        search_patterns(model, prompt, candidates=mixed)
    with pytest.raises(ValueError, match="BlockSparse.block_size=64 must equal block_kv=128"):
        search_patterns(model, prompt, block=128)  # the default candidates' blocks are 64
