"""`python -m convert` under bad input: exit code 2 with one stderr line, and never lost data.

Data-safety cases hash every file under the folders involved before and after: a refused, failed
or interrupted conversion must leave them byte-identical, and leave no temporary folder behind;
one killed outright leaves its temporary folder, which the next conversion removes.
"""

import hashlib
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest

import convert.checkpoint as convert_checkpoint
from convert.__main__ import main as convert_main
from convert.checkpoint import export_hf
from minference_jax.models.checkpoint import CheckpointError, load_model

ROOT = pathlib.Path(__file__).parents[1]
LLAMA = ROOT / "tests" / "fixtures" / "hf" / "llama"


def tree_digest(folder: pathlib.Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file (and "<dir>" for folders) under `folder`."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        out[rel] = "<dir>" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    shutil.copytree(LLAMA, folder)
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.fixture
def occupied(tmp_path):
    """A destination holding another model's files (must never be mixed or lost)."""
    folder = tmp_path / "occupied"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "phi3"}')
    (folder / "model.safetensors").write_bytes(os.urandom(256))
    (folder / "notes" / "deep").mkdir(parents=True)
    (folder / "notes" / "deep" / "keep.txt").write_text("mine")
    return folder


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [sys.executable, "-m", "convert", *args, "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


def assert_one_line_error(rc: int, err: str, pattern: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and re.search(pattern, lines[0]), err


def cli_in_process(capsys, *args: str) -> tuple[int, str]:
    rc = convert_main([*map(str, args), "--quiet"])
    return rc, capsys.readouterr().err


def leftovers(parent: pathlib.Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".converting-" in p.name or ".replaced-" in p.name]


def test_bad_config_list_as_a_subprocess(src, tmp_path):
    (src / "config.json").write_text("[1, 2]")
    result = run_cli(str(src), str(tmp_path / "out"))
    assert_one_line_error(result.returncode, result.stderr, "JSON object, got list")
    assert not (tmp_path / "out").exists()


def test_non_empty_destination_as_a_subprocess_keeps_every_byte(src, occupied):
    before = tree_digest(occupied), tree_digest(src)
    result = run_cli(str(src), str(occupied))
    assert_one_line_error(result.returncode, result.stderr, "not empty.*--overwrite")
    assert (tree_digest(occupied), tree_digest(src)) == before


def test_weight_map_not_an_object_as_a_subprocess(src, tmp_path):
    (src / "model.safetensors.index.json").write_text('{"weight_map": ["model.safetensors"]}')
    result = run_cli(str(src), str(tmp_path / "out"))
    assert_one_line_error(result.returncode, result.stderr, "weight_map must be an object")


@pytest.mark.parametrize(
    "edit, pattern",
    [
        ({"num_attention_heads": 0}, "num_attention_heads.*>= 1, got 0"),
        ({"num_key_value_heads": 0}, "num_key_value_heads.*>= 1, got 0"),
        ({"hidden_size": "64"}, "hidden_size.*integer.*'64'"),
        ({"num_hidden_layers": None}, "lacks required field 'num_hidden_layers'"),
        ({"vocab_size": 256.5}, "vocab_size.*integer"),
        ({"rms_norm_eps": "tiny"}, "malformed field"),
        ({"rms_norm_eps": None}, "malformed field"),
        ({"rope_scaling": [1, 2]}, "malformed field"),
    ],
)
def test_malformed_config_fields(src, tmp_path, capsys, edit, pattern):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **edit}))
    rc, err = cli_in_process(capsys, src, tmp_path / "out")
    assert_one_line_error(rc, err, pattern)
    assert not (tmp_path / "out").exists()


def test_binary_config(src, tmp_path, capsys):
    (src / "config.json").write_bytes(b"\xff\xfe\x00garbage")
    rc, err = cli_in_process(capsys, src, tmp_path / "out")
    assert_one_line_error(rc, err, "not valid JSON")


def test_source_equals_destination_writes_nothing(src, capsys):
    before = tree_digest(src)
    rc, err = cli_in_process(capsys, src, src)
    assert_one_line_error(rc, err, "same folder")
    rc, err = cli_in_process(capsys, src, src / ".." / "src")
    assert_one_line_error(rc, err, "same folder")
    assert tree_digest(src) == before


def test_destination_inside_source_and_source_inside_destination(src, tmp_path, capsys):
    before = tree_digest(tmp_path)
    rc, err = cli_in_process(capsys, src, src / "converted")
    assert_one_line_error(rc, err, "inside the source")
    rc, err = cli_in_process(capsys, src, tmp_path, "--overwrite")
    assert_one_line_error(rc, err, "source .* inside the destination")
    assert tree_digest(tmp_path) == before


def test_destination_that_is_a_file_or_under_a_file(src, tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep")
    for dst, pattern in ((target, "not a folder"), (target / "sub", "not a folder")):
        for extra in ((), ("--overwrite",)):
            rc, err = cli_in_process(capsys, src, dst, *extra)
            assert_one_line_error(rc, err, pattern)
    assert target.read_text() == "keep"


def test_destination_not_writable(src, tmp_path, capsys, monkeypatch):
    real_access = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    locked = locked.resolve()
    # Permission bits do not stop root, so the check's own probe is made to say no.
    monkeypatch.setattr(
        convert_checkpoint.os,
        "access",
        lambda p, mode: False if pathlib.Path(p) == locked else real_access(p, mode),
    )
    rc, err = cli_in_process(capsys, src, locked / "out")
    assert_one_line_error(rc, err, "cannot write to .*locked.*permission denied")
    assert list(locked.iterdir()) == []


def test_empty_destination_folder_is_filled(src, tmp_path):
    dst = tmp_path / "empty"
    dst.mkdir()
    assert convert_main([str(src), str(dst), "--quiet", "--dtype", "float32"]) == 0
    assert sorted(p.name for p in dst.iterdir()) == [
        "config.json",
        "generation_config.json",
        "minference_jax.json",
        "params.safetensors",
        "tokenizer.json",
    ]
    (tmp_path / "probe").mkdir()
    assert dst.stat().st_mode == (tmp_path / "probe").stat().st_mode  # as made by mkdir
    assert leftovers(tmp_path) == []
    load_model(dst)


def test_relative_destination_spellings(src, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert convert_main([str(src), "nowhere/../out/", "--quiet", "--dtype", "float32"]) == 0
    assert (tmp_path / "out" / "params.safetensors").is_file()
    assert not (tmp_path / "nowhere").exists() and leftovers(tmp_path) == []


def test_overwrite_replaces_the_destination_as_a_whole(src, occupied, tmp_path):
    assert convert_main([str(src), str(occupied), "--quiet", "--overwrite"]) == 0
    assert not (occupied / "notes").exists() and not (occupied / "model.safetensors").exists()
    assert json.loads((occupied / "config.json").read_text())["model_type"] == "llama"
    _, config = load_model(occupied)
    assert config.family == "llama" and config.num_layers == 2
    assert leftovers(tmp_path) == []


def _fail_after_first_file(monkeypatch, error):
    """The safetensors writer raises once config.json is already written (a full disk...)."""

    def failing_save_file(tensors, path, *args, **kwargs):
        assert (pathlib.Path(path).parent / "config.json").is_file()
        raise error

    monkeypatch.setattr(convert_checkpoint, "save_file", failing_save_file)


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_mid_save_leaves_destination_exactly_as_before(
    src, occupied, tmp_path, monkeypatch, overwrite, error
):
    dst = occupied if overwrite else tmp_path / "new"
    before = tree_digest(tmp_path)
    _fail_after_first_file(monkeypatch, error)
    expected = CheckpointError if isinstance(error, OSError) else KeyboardInterrupt
    with pytest.raises(expected):
        convert_checkpoint.convert_folder(src, dst, "float32", progress=False, overwrite=overwrite)
    assert tree_digest(tmp_path) == before  # nothing changed, no temporary folder left


def test_failed_rename_into_place_restores_the_old_destination(
    src, occupied, tmp_path, monkeypatch
):
    before = tree_digest(tmp_path)
    real_rename = os.rename

    def rename(a, b):
        if ".converting-" in str(a):
            raise OSError(5, "Input/output error")
        real_rename(a, b)

    monkeypatch.setattr(convert_checkpoint.os, "rename", rename)
    with pytest.raises(CheckpointError, match="left unchanged"):
        convert_checkpoint.convert_folder(src, occupied, "float32", progress=False, overwrite=True)
    assert tree_digest(tmp_path) == before


def test_every_help_entry_has_a_help_text_and_default(capsys):
    with pytest.raises(SystemExit):
        convert_main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "replace a non-empty DST as a whole" in out and "only after the new" in out
    options = [o.strip() for o in re.split(r"(?=\s--\w)", out.split("options:")[1])[1:]]
    options = [o for o in options if not o.startswith("--help")]
    assert {o.split()[0] for o in options} == {
        "--dtype",
        "--overwrite",
        "--quiet",
        "--rope-scaling",
    }
    for option in options:
        assert "default" in option, option


# A conversion that stops mid-write: the safetensors writer has written part of its file, says
# where, and waits to be signalled (or finishes after 300 s).
PAUSED_CONVERSION = """
import pathlib, sys, time
import convert.checkpoint
from convert.__main__ import main

def paused_save_file(tensors, path, *args, **kwargs):
    pathlib.Path(path).write_bytes(b"partial")
    print(pathlib.Path(path).parent, flush=True)
    time.sleep(300)

convert.checkpoint.save_file = paused_save_file
sys.exit(main(sys.argv[1:]))
"""


def start_paused_conversion(src, dst) -> tuple[subprocess.Popen, pathlib.Path]:
    """A `python -m convert SRC DST` process stopped while writing; returns it and its staging
    folder."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", PAUSED_CONVERSION, str(src), str(dst), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    line = proc.stdout.readline().strip()
    if not line:
        proc.kill()
        pytest.fail(f"the paused conversion did not start: {proc.communicate()[1]}")
    staging = pathlib.Path(line)
    assert staging.parent == dst.parent and ".converting-" in staging.name
    return proc, staging


def test_killed_conversion_leaves_staging_that_the_next_one_removes(src, tmp_path):
    dst = tmp_path / "out"
    proc, staging = start_paused_conversion(src, dst)
    proc.kill()
    proc.wait(timeout=60)
    # SIGKILL cannot be handled: the half-written folder stays, its owner's pid recorded.
    assert (staging / "params.safetensors").read_bytes() == b"partial"
    assert (staging / ".owner").read_text().strip() == str(proc.pid)
    result = run_cli(str(src), str(dst))
    assert result.returncode == 0, result.stderr
    assert not staging.exists() and leftovers(tmp_path) == []
    load_model(dst)


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_terminated_conversion_cleans_up_with_one_line(src, occupied, stop):
    dst = occupied.parent / "out"
    before = tree_digest(occupied.parent)
    proc, staging = start_paused_conversion(src, dst)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + stop, err
    assert err.strip() == f"error: interrupted by {stop.name}; {dst} left as it was"
    assert not staging.exists()
    assert tree_digest(occupied.parent) == before


def test_live_conversions_and_unknown_folders_are_never_removed(src, tmp_path):
    dst = tmp_path / "out"
    # Named like staging folders: one without an owner file (being set up, or not ours), one
    # of another destination; and a dead one of this destination (its pid, its lock free).
    unowned = tmp_path / ".out.converting-0123456789ab"
    other = tmp_path / ".other.converting-0123456789ab"
    dead = tmp_path / ".out.converting-ba9876543210"
    for folder in (unowned, other, dead):
        folder.mkdir()
        (folder / "params.safetensors").write_bytes(b"partial")
    (other / ".owner").write_text("1\n")
    (dead / ".owner").write_text("1\n")
    proc, live = start_paused_conversion(src, dst)
    try:
        assert convert_main([str(src), str(dst), "--quiet"]) == 0
        assert live.is_dir() and unowned.is_dir() and other.is_dir() and not dead.exists()
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and not live.exists()
    load_model(dst)  # the finished conversion, untouched by the stopped one


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=oct)
def test_written_files_get_the_mode_a_new_file_gets(src, tmp_path, umask):
    (src / "tokenizer.json").chmod(0o444)  # copied side files take the umask's mode, not SRC's
    previous = os.umask(umask)
    try:
        assert convert_main([str(src), str(tmp_path / "out"), "--quiet"]) == 0
        model, _ = load_model(tmp_path / "out")
        export_hf(model, json.loads((src / "config.json").read_text()), tmp_path / "hf")
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    modes["model.safetensors"] = (tmp_path / "hf" / "model.safetensors").stat().st_mode & 0o777
    assert "params.safetensors" in modes
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["SRC", "DST", "--dtype", "int8"], r"--dtype: invalid choice: 'int8'"),
        (["SRC"], "required: dst"),
        (["SRC", "DST", "EXTRA"], "unrecognized arguments: EXTRA"),
        (["SRC", "DST", "--rope-scaling", "[1]"], "--rope-scaling: must be a JSON object"),
    ],
)
def test_usage_errors_are_one_line(args, pattern):
    result = run_cli(*args)
    assert_one_line_error(result.returncode, result.stderr, pattern)
    assert "usage:" not in result.stderr and result.stdout == ""
