"""Bad input to `python -m minference_jax.prefill`: exit code 2, one line on stderr, no traceback.

Most cases call `main(argv)` in-process (a JAX import per case would cost seconds); a few run
the real process to check the exit code and stderr end to end.
"""

import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from minference_jax.config_io import shipped_configs
from minference_jax.models.defaults import PASSKEY_TINY as CHECKPOINT
from minference_jax.prefill import main

ROOT = pathlib.Path(__file__).parent.parent
LLAMA = str(ROOT / "tests" / "fixtures" / "hf" / "llama")
ENV = {"JAX_PLATFORMS": "cpu", "PATH": os.environ.get("PATH", "")}
LLAMA_3_CONFIG = str(shipped_configs()["Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern"])


def assert_one_line_error(code: int, err: str, message: str) -> None:
    assert code == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith("error: ") and "Traceback" not in err
    assert message in err, err


def run_main(capsys, argv) -> tuple[int, str]:
    """main(argv) -> (exit code, stderr), whether it returns or argparse exits."""
    try:
        code = main([*argv, "--quiet"])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    assert captured.out == ""
    return code, captured.err


def _config(tmp_path, content) -> str:
    """A config file for the embedded model (2 layers x 4 heads): bytes, or a JSON object."""
    path = tmp_path / "config.json"
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
    return str(path)


VS = ["vertical_and_slash", 30, 50, 0.9]
BAD_CONFIGS = {
    "directory": (lambda tmp: str(tmp), "is a directory"),
    "binary": (lambda tmp: _config(tmp, bytes(range(256)) * 4), "not UTF-8 JSON text"),
    "head key 01": (
        lambda tmp: _config(tmp, [{"0": VS, "01": VS, "2": VS, "3": VS}] * 2),
        "without leading zeros or signs, got '01'",
    ),
    "block-sparse 10^12": (
        lambda tmp: _config(
            tmp, [{"0": ["block_sparse", 10**12, 0, 0.9], "1": VS, "2": VS, "3": VS}] * 2
        ),
        "v_size must be <= 2147483647",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_bad_pattern_config(capsys, tmp_path, case):
    make, message = BAD_CONFIGS[case]
    code, err = run_main(capsys, ["--pattern-config", make(tmp_path), "--max-new-tokens", "1"])
    assert_one_line_error(code, err, message)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-new-tokens", "-1"], "--max-new-tokens must be >= 0, got -1"),
        (["--chunk-size", "0"], "--chunk-size must be >= 1, got 0"),
        (["--chunk-size", "-8"], "--chunk-size must be >= 1"),
        (["--tensor-parallel", "-1"], "--tensor-parallel must be >= 0"),
        (["--repeats", "-1"], "--repeats must be >= 0"),
        (["--synthetic-tokens", "0"], "--synthetic-tokens must be >= 1"),
        (["--mode", "dense", "--pattern-config", "x.json"], "--pattern-config goes with"),
        (["--mode", "dense", "--budget", "4,8"], "--budget does not apply to --mode dense"),
        (["--pattern-config", "x.json", "--budget", "30,50"], "not both"),
        (["--mode", "block-sparse", "--budget", "4,32"], "expected top_k, got 4,32"),
        (["--mode", "a-shape", "--budget", "1,2,3"], "expected n_init,n_local"),
        (["--mode", "minference", "--budget", "1000000000000,5"], "sizes must be in [0, 2147"),
        (["--budget=-1,5"], "sizes must be in [0,"),
        (["--budget", "a,b"], "expected comma-separated numbers (sizes or fractions), got 'a,b'"),
        (["--mode", "adaptive-vs", "--budget", "nan"], "finite numbers >= 0, got 'nan' in 'nan'"),
        (["--mode", "anti-diagonal", "--budget", "0.9,"], "got '0.9,'"),
        (["--mode", "sparse"], "invalid choice: 'sparse'"),
        (["--max-new-tokens", "two"], "invalid int value"),
        (["--model", "/no/such/folder"], "checkpoint folder not found"),
        (["--model", LLAMA, "--synthetic-tokens", "300"], "max_position_embeddings is 256"),
        (["--model", LLAMA, "--synthetic-tokens", str(10**12)], "pass --allow-long"),
        (["--prompt", "   "], "empty prompt"),
        (["--prompt", "caf\udce9"], "--prompt is not valid UTF-8 text"),
        (["--model", LLAMA, "--prompt", "hi"], "no tokenizer.json"),
        (
            ["--model", LLAMA, "--synthetic-tokens", "50", "--pattern-config", LLAMA_3_CONFIG],
            "32 layers x 32 heads, the model has 2 layers x 4 query heads",
        ),
        (["--pattern-config", "/no/such.json"], "pattern config not found"),
    ],
)
def test_bad_arguments(capsys, argv, message):
    assert_one_line_error(*run_main(capsys, argv), message)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"caf\xe9 latin-1", "is not UTF-8 text (invalid continuation byte at byte 3)"),
        (b"text\x00with NUL", "holds NUL bytes"),
    ],
)
def test_prompt_file_and_stdin_that_are_not_text(capsys, tmp_path, monkeypatch, data, message):
    path = tmp_path / "prompt.txt"
    path.write_bytes(data)
    assert_one_line_error(*run_main(capsys, ["--prompt-file", str(path)]), message)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    code, err = run_main(capsys, ["--prompt-file", "-"])
    assert_one_line_error(code, err, message)
    assert err.startswith("error: stdin ")


def test_prompt_file_that_is_a_directory(capsys, tmp_path):
    assert_one_line_error(*run_main(capsys, ["--prompt-file", str(tmp_path)]), "Is a directory")


@pytest.mark.parametrize(
    "tokenizer, message",
    [(b'{"version": "1.0", "model": {', "EOF while parsing"), (b"\xff\xfe", "valid UTF-8")],
)
def test_corrupt_tokenizer_json(capsys, tmp_path, tokenizer, message):
    folder = tmp_path / "model"
    shutil.copytree(CHECKPOINT, folder)
    (folder / "tokenizer.json").write_bytes(tokenizer)
    code, err = run_main(capsys, ["--model", str(folder), "--prompt", "hello"])
    assert_one_line_error(code, err, message)
    assert "tokenizer.json" in err


def _process(*argv, stdin=b""):
    return subprocess.run(
        [sys.executable, "-m", "minference_jax.prefill", *argv],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env=ENV,
    )


@pytest.mark.parametrize(
    "argv, stdin, message",
    [
        (["--prompt-file", "-"], b"\xff\xfe not utf-8", "stdin is not UTF-8 text"),
        (["--mode", "block-sparse", "--budget", "4,32"], b"", "expected top_k"),
        (["--mode", "sparse"], b"", "invalid choice"),
    ],
)
def test_process_exit_code_and_one_line(argv, stdin, message):
    result = _process(*argv, stdin=stdin)
    assert_one_line_error(result.returncode, result.stderr.decode(), message)
    assert result.stdout == b""
