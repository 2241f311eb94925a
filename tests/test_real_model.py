"""benchmarks.real_model on a tiny random Qwen2 with a byte-level tokenizer.json: prompt
builders, the chunked perplexity, YaRN past the native context, and one whole run."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import real_model
from convert.checkpoint import convert_folder
from minference_jax.models import AttentionSpec
from minference_jax.models.checkpoint import load_model
from minference_jax.tokenization import ByteTokenizer, save_byte_tokenizer

QWEN2 = pathlib.Path(__file__).parent / "fixtures" / "hf" / "qwen2"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("real") / "tiny-qwen2"
    convert_folder(QWEN2, dst, "float32", progress=False)
    save_byte_tokenizer(dst / "tokenizer.json")
    return dst


@pytest.fixture(scope="module")
def corpus():
    return real_model.Corpus(ByteTokenizer(), python_only=True)


@pytest.mark.parametrize("length", [520, 777])
def test_prompts_have_the_exact_length_and_hold_the_needle_at_its_depth(corpus, length):
    tok = ByteTokenizer()
    ids, keys, depths = real_model.passkey_batch(tok, corpus, length, [0.0, 0.5, 1.0], 2, seed=3)
    assert (
        ids.shape == (6, length)
        and ids.dtype == np.int32
        and depths == [0.0] * 2 + [0.5] * 2 + [1.0] * 2
    )
    question = "What is the pass key? Answer with the number only."
    prefix, suffix = real_model.chat(tok, tok.encode(real_model.INTRO), f"\n\n{question}")
    for row, key, depth in zip(ids, keys, depths, strict=True):
        needle = tok.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
        room = length - len(prefix) - len(suffix) - len(needle)
        at = len(prefix) + round(depth * room)  # the needle's place in the text
        assert list(row[: len(prefix)]) == prefix and list(row[-len(suffix) :]) == suffix
        assert list(row[at : at + len(needle)]) == needle
        assert len(key) == 5 and key.isdigit()
    code, names = real_model.code_batch(tok, corpus, length, 3, seed=3)
    assert code.shape == (3, length)
    for row, name in zip(code, names, strict=True):
        text = tok.decode(row)
        assert text.count(f"def {name}(items):") == 1
    assert len(set(names)) == 3


def test_a_prompt_too_short_for_any_text_is_refused(corpus):
    with pytest.raises(ValueError, match="no room"):
        real_model.passkey_batch(ByteTokenizer(), corpus, 300, [0.5], 1, seed=0)


def test_yarn_config_spans_factor_times_the_native_context(converted):
    _, config = load_model(converted, jnp.float32)
    yarn = real_model.yarn_config(config, 4.0, 256)
    assert yarn.rope.rope_type == "yarn" and yarn.rope.factor == 4.0
    assert yarn.rope.original_max_position_embeddings == 256
    assert yarn.max_position_embeddings == 1024 and yarn.rope.theta == config.rope.theta


def test_chunked_perplexity_equals_the_full_logits_loss(converted, corpus, monkeypatch):
    model, config = load_model(converted, jnp.float32)
    rng = np.random.default_rng(0)
    ids = np.stack([corpus.window(rng, 301) for _ in range(2)])
    monkeypatch.setattr(real_model, "LOGITS_CHUNK", 64)  # 5 chunks, the last one ragged
    got = real_model.sequence_nll(model, ids, AttentionSpec())
    x = model(jnp.asarray(ids[:, :-1]))  # the model's own forward, all logits at once
    logp = jax.nn.log_softmax(x.astype(jnp.float32), -1)
    want = -np.take_along_axis(np.asarray(logp), ids[:, 1:, None], -1)[..., 0].mean(-1)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got.shape == (2,) and np.all(got > 0)


def test_one_run_writes_accuracy_and_speed_for_every_mode(converted, tmp_path, capsys):
    argv = ["--model", str(converted), "--modes", "dense", "vs:64,64", "--lengths", "520"]
    argv += ["--speed-lengths", "640", "--depths", "0", "1", "--samples", "1"]
    argv += ["--code-prompts", "1", "--ppl-docs", "1", "--repeats", "1", "--dtype", "float32"]
    argv += ["--yarn-above", "600", "--out", str(tmp_path)]
    rows = real_model.main(argv)
    kinds = {(r["kind"], r["mode"], r["length"]) for r in rows}
    for mode in ("dense", "vs:64,64"):
        for length in (520,):
            assert {
                ("passkey", mode, length),
                ("code", mode, length),
                ("ppl", mode, length),
            } <= kinds
        assert ("speed", mode, 640) in kinds
    for row in (r for r in rows if r["kind"] == "speed"):  # layer 0's parts, timed alone
        assert row["layer0_ms"] > 0 and 0.0 <= row["share_index"] <= 1.0
    speed = {r["mode"]: r for r in rows if r["kind"] == "speed"}
    assert speed["dense"]["share_index"] == 0.0 < speed["vs:64,64"]["share_index"]
    losses = {(r["mode"], r["length"]): r["nll"] for r in rows if r["kind"] == "ppl"}
    # VS(64, 64) keeps the diagonal and some columns: close to dense, not equal
    assert losses[("vs:64,64", 520)] == pytest.approx(losses[("dense", 520)], rel=0.05)
    assert losses[("vs:64,64", 520)] != losses[("dense", 520)]
    assert all(np.isfinite(v) and v > 0 for v in losses.values())
    (report,) = tmp_path.glob("real_model_*.json")
    saved = json.loads(report.read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["meta"]["yarn_above"] == 600
    table = report.with_suffix(".md").read_text()
    assert "VerticalSlash(64, 64)" in table and "640" in table and "index share of layer 0" in table
    assert report.with_suffix(".png").stat().st_size > 0


def test_no_length_is_refused(converted):
    with pytest.raises(SystemExit) as err:
        real_model.main(["--model", str(converted)])
    assert err.value.code == 2
