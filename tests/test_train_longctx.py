"""The long-context training script (tiny CPU configuration) and the multi-key generator."""

import gzip
import io
import json
import pathlib
import tarfile

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from minference_jax import passkey

REPO = pathlib.Path(__file__).parents[1]


@pytest.mark.parametrize("num_keys", [1, 3, 6])
def test_multikey_prompt_needles_and_question(num_keys):
    rng = np.random.default_rng(num_keys)
    pool = passkey.haystack(rng, 3000)
    prompt, key = passkey.multikey_prompt(rng, 1000, num_keys, pool=pool)
    assert len(prompt) == 1000
    question = prompt[prompt.rindex(" What is the number of ") :]
    name = question.split("number of ")[1].split("?")[0]
    assert question == passkey.multikey_question(name)
    assert passkey.multikey_needle(name, key) in prompt
    assert prompt.count("The number of ") == num_keys + 1  # the needles and the question
    assert len(set(n.split(" is ")[0] for n in prompt.split("The number of ")[1:])) == num_keys + 0


def test_multikey_prompt_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="needs >="):
        passkey.multikey_prompt(rng, 120, 3)
    with pytest.raises(ValueError, match="num_keys"):
        passkey.multikey_prompt(rng, 500, 0)


def test_training_batch_retrieval_rows_over_real_text():
    from benchmarks.train_longctx import training_batch

    rng = np.random.default_rng(3)
    stream = np.frombuffer((REPO / "README.md").read_bytes(), np.uint8)
    ids, mask = training_batch(rng, stream, 16, 600, 0.5, 200)
    assert ids.shape == mask.shape == (16, 600) and ids.dtype == np.uint8
    rows = np.flatnonzero(mask.sum(-1))
    assert 0 < len(rows) < 16 and np.all(mask[rows, -passkey.KEY_DIGITS :] == 1)
    assert mask.sum() == len(rows) * passkey.KEY_DIGITS
    for row in rows:
        text = bytes(ids[row]).decode("latin-1")
        key = text[-passkey.KEY_DIGITS :]
        assert key.isdigit() and text.count(key) >= 2  # stated in a needle, then answered
        assert text[: -passkey.KEY_DIGITS].endswith(" is ")


def _run(tmp_path, name, *extra):
    from benchmarks.train_longctx import main

    out, ckpt = tmp_path / name / "out", tmp_path / name / "ckpt"
    argv = ["--tiny", "--out", str(out), "--ckpt", str(ckpt), "--steps", "6"]
    main([*argv, "--corpus-root", str(REPO / "minference_jax"), "--log-every", "1", *extra])
    return out, ckpt


def test_tiny_run_loads_and_resume_is_identical(tmp_path):
    from benchmarks.train_longctx import Trainer, flat_params
    from convert.checkpoint import flat_params as checkpoint_params
    from convert.checkpoint import load_model

    out, _ = _run(tmp_path, "full")
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 7 and "model.safetensors.index.json" in files, files
    assert all((out / f).stat().st_size < 15 << 20 for f in files)
    model, config = load_model(out)
    assert config.num_layers == 2 and config.vocab_size == 256
    logits = model(jnp.asarray([list(b"def main():\n    return 0\n")]))
    assert logits.shape == (1, 25, 256) and bool(jnp.isfinite(logits).all())
    log = json.loads((out / "training_log.json").read_text())
    assert [r["step"] for r in log["steps"]] == list(range(1, 7))
    assert {r["phase"] for r in log["steps"]} == {"64", "128"}
    assert log["corpus"]["heldout_files"] >= 1 and log["corpus"]["train_files"] > 5
    assert set(log["final_eval"]) >= {"heldout_bits_per_byte_128", "passkey_accuracy_128"}
    with tarfile.open(out / "extras.tar") as tar:
        heldout = gzip.decompress(tar.extractfile("heldout_text.jsonl.gz").read())
        assert "loss.png" in tar.getnames()
    held = [json.loads(line) for line in io.BytesIO(heldout)]
    assert held and all(h["path"].startswith("minference_jax/") for h in held)

    # interrupted after 2 steps, resumed: the same parameters and losses as one run of 6 steps
    resumed_out, ckpt = _run(tmp_path, "resumed", "--stop-after", "2")
    partial = json.loads((resumed_out / "training_log.json").read_text())
    assert [r["step"] for r in partial["steps"]] == [1, 2] and "final_eval" not in partial
    _run(tmp_path, "resumed")
    resumed = json.loads((resumed_out / "training_log.json").read_text())
    assert [r["lm_loss"] for r in resumed["steps"]] == [r["lm_loss"] for r in log["steps"]]
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        a, b = load_file(str(out / shard)), load_file(str(resumed_out / shard))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    state = load_file(str(ckpt / "current" / "state.safetensors"))
    assert any(k.startswith("opt/") for k in state)

    # --init-from reads the exported weights back (bf16 values, exactly)
    trainer = Trainer(config, 1, 0.1, 1.0)
    trainer.load_weights(out)
    ours = {k: np.asarray(v) for k, v in flat_params(trainer.params).items()}
    exported = {k: np.asarray(v) for k, v in checkpoint_params(model).items()}
    assert ours.keys() == exported.keys()
    for k in ours:
        np.testing.assert_array_equal(ours[k], exported[k], err_msg=k)


def test_bad_phases_and_ckpt_inside_out_exit_2(tmp_path, capsys):
    from benchmarks.train_longctx import main

    argv = ["--tiny", "--out", str(tmp_path / "o"), "--ckpt", str(tmp_path / "c")]
    for phases in (["64:2:0.5"], ["64:2:1.5"], ["64:x:1"], ["128:2:0.6", "64:2:0.5", "64:1:1"]):
        with pytest.raises(SystemExit) as err:
            main([*argv, "--phases", *phases])
        assert err.value.code == 2 and "phase" in capsys.readouterr().err
    with pytest.raises(SystemExit) as err:
        main(["--tiny", "--out", str(tmp_path), "--ckpt", str(tmp_path / "ckpt")])
    assert err.value.code == 2 and "inside --out" in capsys.readouterr().err


def test_bad_corpus_root_exits_2(tmp_path, capsys):
    from benchmarks.train_longctx import main

    with pytest.raises(SystemExit) as err:
        main(
            ["--tiny", "--out", str(tmp_path / "o"), "--ckpt", str(tmp_path / "c")]
            + ["--corpus-root", str(tmp_path / "missing")]
        )
    assert err.value.code == 2 and "not a folder" in capsys.readouterr().err


def test_failing_step_still_leaves_outputs_and_log(tmp_path, monkeypatch):
    from benchmarks import train_longctx

    original = train_longctx.Trainer.train_step
    calls = []

    def failing_step(self, ids, mask, lr):
        calls.append(ids.shape)
        if len(calls) == 4:  # the first step of the second phase, like a failing compile
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")
        return original(self, ids, mask, lr)

    monkeypatch.setattr(train_longctx.Trainer, "train_step", failing_step)
    out, _ = _run(tmp_path, "failing")
    log = json.loads((out / "training_log.json").read_text())
    assert log["stopped"].startswith("error: RuntimeError: RESOURCE_EXHAUSTED")
    assert [r["step"] for r in log["steps"]] == [1, 2, 3]
    assert isinstance(log["final_eval"]["heldout_bits_per_byte_128"], float)
    assert (out / "model-00002-of-00002.safetensors").is_file()
