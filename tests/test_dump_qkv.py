"""benchmarks.dump_qkv on a tiny random Qwen2 converted with a byte-level tokenizer.json."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import dump_qkv
from benchmarks.heldout import heldout_docs
from convert.checkpoint import convert_folder
from minference_jax.models.checkpoint import load_model
from minference_jax.models.rope import rope_tables
from minference_jax.tokenization import ByteTokenizer, save_byte_tokenizer

QWEN2 = pathlib.Path(__file__).parent / "fixtures" / "hf" / "qwen2"
N = 200  # not a multiple of 64


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    dst = tmp_path_factory.mktemp("dump") / "tiny-qwen2"
    convert_folder(QWEN2, dst, "float32", progress=False)
    save_byte_tokenizer(dst / "tokenizer.json")
    return dst


def _direct_layer1_qkv(model, config, ids):
    """Layer 0 written out with the model's modules (f32 causal GQA softmax), then layer 1's qkv."""
    x = model.embed[...][jnp.asarray(ids)[None]]
    n = x.shape[1]
    cos, sin = rope_tables(config, jnp.arange(n), n)
    l0 = model.layers[0]
    q, k, v = l0.attn.qkv(l0.input_norm(x), cos, sin)
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    scores = jnp.where(jnp.tril(jnp.ones((n, n), bool)), scores, -jnp.inf)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    x = x + l0.attn.o_proj(o.reshape(1, n, -1))
    x = x + l0.mlp(l0.post_attn_norm(x))
    l1 = model.layers[1]
    return l1.attn.qkv(l1.input_norm(x), cos, sin)


def test_layer1_matches_the_models_own_modules_in_f32(converted):
    model, config = load_model(converted, jnp.float32)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, config.vocab_size, N).astype(np.int32)
    want = _direct_layer1_qkv(model, config, ids)
    for chunk in (dump_qkv.CHUNK, 64):  # one slice, and 4 slices with a ragged last one
        got = dump_qkv.layer_qkv(model, config, ids, 1, chunk=chunk)
        for name, g, w in zip("qkv", got, want, strict=True):
            assert g.shape == w.shape and g.dtype == jnp.float32, name
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=3e-5, err_msg=name)
    assert got[0].shape == (1, N, config.num_heads, config.head_dim)
    assert got[1].shape == (1, N, config.num_kv_heads, config.head_dim)
    with pytest.raises(ValueError, match="layer must be in"):
        dump_qkv.layer_qkv(model, config, ids, config.num_layers)


def test_cli_bf16_round_trips_exactly(converted, tmp_path, capsys):
    out = tmp_path / "sub" / "qkv.npz"
    argv = ["--model", converted, "--layer", 1, "--tokens", N, "--out", out, "--seed", 3]
    assert dump_qkv.main([str(a) for a in argv]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "q [1, 200, 4, 16] bfloat16" and printed[2].startswith("v [1, 200, 2, ")
    assert "tiny-qwen2 layer 1 at 200 tokens" in printed[3]

    q, k, v = dump_qkv.load_qkv(out)
    with np.load(out) as f:
        assert str(f["dtype"]) == "bfloat16" and f["q"].dtype == np.uint16
        assert int(f["layer"]) == 1 and int(f["tokens"]) == N and int(f["seed"]) == 3
        assert str(f["model"]) == "tiny-qwen2" and str(f["rope_type"]) == "default"
        ids = f["ids"]
    # the prompt: 200 consecutive bytes of the held-out documents joined as documented
    text = "\n\n".join(f"{p}\n{t}" for p, t in heldout_docs()).encode()
    assert len(ids) == N and bytes(ids.astype(np.uint8)) in text

    model, config = load_model(converted, jnp.bfloat16)
    want = dump_qkv.layer_qkv(model, config, ids, 1)
    for name, g, w in zip("qkv", (q, k, v), want, strict=True):
        assert g.dtype == jnp.bfloat16 and g.shape == w.shape, name
        np.testing.assert_array_equal(
            np.asarray(g).view(np.uint16), np.asarray(w).view(np.uint16), err_msg=name
        )


def test_load_qkv_round_trips_f32_and_f16(tmp_path):
    rng = np.random.default_rng(0)
    for dtype in (jnp.float32, jnp.float16, jnp.bfloat16):
        q, k, v = (jnp.asarray(rng.standard_normal((1, 5, h, 8)), dtype) for h in (4, 2, 2))
        path = tmp_path / f"{jnp.dtype(dtype).name}.npz"
        dump_qkv.save_qkv(path, q, k, v, layer=0)
        for got, want in zip(dump_qkv.load_qkv(path), (q, k, v), strict=True):
            assert got.dtype == dtype
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


def test_errors(converted, tmp_path, capsys):
    with pytest.raises(ValueError, match="fewer than 100"):
        dump_qkv.prompt_ids(ByteTokenizer(), 100, docs=(("a.py", "x = 1"),))
    ids = dump_qkv.prompt_ids(ByteTokenizer(), 6, seed=0, docs=(("a.py", "x = 1"),))
    assert bytes(ids.astype(np.uint8)) in b"a.py\nx = 1"

    no_tokenizer = tmp_path / "no-tok"
    convert_folder(QWEN2, no_tokenizer, "float32", progress=False)
    base = ["--tokens", "10", "--out", str(tmp_path / "x.npz")]
    assert dump_qkv.main(["--model", str(no_tokenizer), "--layer", "0", *base]) == 2
    assert "has no tokenizer.json" in capsys.readouterr().err
    assert dump_qkv.main(["--model", str(converted), "--layer", "2", *base]) == 2
    assert "--layer must be in [0, 2)" in capsys.readouterr().err
    assert dump_qkv.main(["--model", str(tmp_path / "missing"), "--layer", "0", *base]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_several_layers_in_one_pass_equal_single_layer_dumps(converted, tmp_path, capsys):
    def dump(layers, out):
        argv = ["--model", converted, "--layer", *layers, "--tokens", N, "--out", out]
        return dump_qkv.main([str(a) for a in [*argv, "--dtype", "float32"]])

    out = tmp_path / "layers"
    assert dump((1, 0), out) == 0
    assert sorted(p.name for p in out.iterdir()) == ["layer00.npz", "layer01.npz"]
    assert "layer 0 at 200 tokens" in capsys.readouterr().out
    model, config = load_model(converted, jnp.float32)
    for layer in (0, 1):
        path = out / f"layer{layer:02d}.npz"
        with np.load(path) as f:
            assert int(f["layer"]) == layer
            ids = f["ids"]
        want = dump_qkv.layer_qkv(model, config, ids, layer)
        for name, g, w in zip("qkv", dump_qkv.load_qkv(path), want, strict=True):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    # several layers need a folder, not a .npz name; a bad layer is refused before any work
    assert dump((0, 1), tmp_path / "x.npz") == 2
    assert "--out is a folder" in capsys.readouterr().err
    assert dump((0, 5), tmp_path / "y") == 2
    assert "--layer must be in [0, 2), got 5" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


def test_yarn_above_the_native_context(converted, tmp_path):
    """--yarn-above: a longer prompt gets real_model's YaRN RoPE, a shorter one the folder's."""
    from benchmarks.real_model import yarn_config

    common = ["--model", converted, "--layer", 0, "--tokens", N, "--seed", 1, "--dtype", "float32"]
    for native, want_type in ((N - 1, "yarn"), (N, "default")):
        out = tmp_path / f"yarn_{native}.npz"
        argv = common + ["--out", out, "--yarn-above", native, "--yarn-factor", 2]
        assert dump_qkv.main([str(a) for a in argv]) == 0
        with np.load(out) as f:
            assert str(f["rope_type"]) == want_type
            ids = f["ids"]
        model, config = load_model(converted, jnp.float32)
        if want_type == "yarn":
            config = yarn_config(config, 2.0, native)
        q, k, _ = dump_qkv.load_qkv(out)
        want_q, want_k, _ = dump_qkv.layer_qkv(model, config, ids, 0)
        np.testing.assert_allclose(q, want_q, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(k, want_k, rtol=1e-6, atol=1e-6)
    plain_q, _, _ = dump_qkv.layer_qkv(model, config, ids, 0)
    yarn_q = dump_qkv.load_qkv(tmp_path / f"yarn_{N - 1}.npz")[0]
    assert not np.allclose(yarn_q, plain_q, atol=1e-3)  # the RoPE did change
