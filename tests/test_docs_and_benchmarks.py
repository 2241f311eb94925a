"""The benchmark scripts run (tiny sizes, CPU) and write where they say."""

import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent


def test_benchmark_default_output_folder_is_git_ignored():
    from benchmarks.timing import DEFAULT_OUT

    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/" + DEFAULT_OUT.relative_to(ROOT).as_posix() + "/" in ignored


def test_index_benchmark_writes_tables_to_its_default_folder(tmp_path, monkeypatch, capsys):
    from benchmarks import index_approx

    monkeypatch.setattr(index_approx, "DEFAULT_OUT", tmp_path)  # what no --out resolves to
    argv = ["--seq-lens", "300", "--heads", "4", "--kv-heads", "2", "--pattern", "vs:100,200"]
    rows = index_approx.main([*argv, "--repeats", "1"])
    assert rows[0]["seq_len"] == 300 and rows[0]["ms"] > 0
    (table,) = tmp_path.glob("*.md")
    assert "| 300 |" in table.read_text()
    assert f"wrote {tmp_path / table.stem}.json, {table}" in capsys.readouterr().out


def test_index_profile_runs_every_stage(capsys):
    from benchmarks import profile_index

    profile_index.main(["--seq-len", "256", "--heads", "4", "--kv-heads", "2", "--repeats", "1"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" ms")]
    assert len(lines) == 9 and any("pallas" in line for line in lines)


@pytest.mark.slow
def test_kernel_benchmark_interpret_smoke(tmp_path):
    from benchmarks import kernels

    kernels.main(
        [
            "--seq-lens",
            "128",
            "--interpret",
            "--repeats",
            "1",
            "--cases",
            "a_shape",
            "vs_fixed",
            "vs_spread",
            "vs_spread_shared",
            "full",
            "--out",
            str(tmp_path),
        ]
    )
    (result,) = tmp_path.glob("*.json")
    rows = json.loads(result.read_text())
    assert {r["case"] for r in rows} == {
        "a_shape",
        "vs_fixed",
        "vs_spread",
        "vs_spread_shared",
        "full",
    }
    assert all(r["spot_rel_err"] < 1e-2 for r in rows)
    assert all(r["rate"] == pytest.approx(r["ideal_ms"] / r["kernel_ms"], rel=0.01) for r in rows)
    full = next(r for r in rows if r["case"] == "full")  # every causal tile
    assert all(r["computed_fraction"] <= full["computed_fraction"] for r in rows)


def test_spread_slashes_cover_many_block_diagonals():
    import numpy as np

    from benchmarks import kernels

    slashes = kernels.spread_slashes(131072, np.random.default_rng(0))
    assert slashes.shape[0] == kernels.HEADS
    for row in slashes:
        row = row[row < 131072]
        assert 5800 <= len(row) <= 6096 and (row[:1024] == np.arange(1024)).all()
        assert len(np.unique(row // 128)) > 250  # hundreds of 128-wide block diagonals


def test_e2e_benchmark_writes_table_and_plot(tmp_path):
    from benchmarks import e2e_prefill

    rows = e2e_prefill.main(
        [
            "--tiny",
            "--seq-lens",
            "128",
            "--modes",
            "dense",
            "config",
            "--layers",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert {r["mode"] for r in rows} == {"dense", "config"}
    assert all(r["extrapolated"] and r["full_model_s"] >= r["prefill_s"] for r in rows)
    (table,) = tmp_path.glob("*.md")
    assert "| 128 | config |" in table.read_text() and "extrapolated" in table.read_text()
    assert next(tmp_path.glob("*.png")).stat().st_size > 1000
    dense, config = sorted(rows, key=lambda r: r["mode"] != "dense")
    assert dense["share_index"] == 0 and config["share_index"] > 0  # CPU: config estimates
    parts = ("share_index", "share_attention_kernel", "share_projections_mlp")
    for row in rows:  # shares of separately timed parts: they sum to 1 by construction
        assert row["layer0_ms"] > 0 and abs(sum(row[p] for p in parts) - 1) < 1e-2
    ceiling = e2e_prefill.speedup_ceiling(config, dense)
    assert ceiling > 0 and f"| {ceiling:.2f} |" in table.read_text()


def test_e2e_benchmark_truncates_only_the_dense_stack(tmp_path):
    from benchmarks import e2e_prefill

    args = ["--tiny", "--seq-lens", "96", "--modes", "dense", "config", "--dense-layers", "1"]
    rows = e2e_prefill.main([*args, "--no-breakdown", "--repeats", "1", "--out", str(tmp_path)])
    by_mode = {r["mode"]: r for r in rows}
    assert by_mode["dense"]["layers"] == 1 and by_mode["dense"]["extrapolated"]
    assert by_mode["config"]["layers"] == e2e_prefill.TINY.num_layers
    assert not by_mode["config"]["extrapolated"]
    dense = by_mode["dense"]
    assert abs(dense["full_model_s"] - dense["prefill_s"] * e2e_prefill.TINY.num_layers) < 3e-3
    table = next(tmp_path.glob("*.md")).read_text()
    assert f"| 96 | dense | 1 | 1 | {dense['full_model_s']}* |" in table


def test_e2e_benchmark_builds_the_weights_a_jitted_init_would():
    """The benchmark builds its model eagerly (fast at 32 layers): same weights as nnx.jit."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks import e2e_prefill
    from minference_jax.models import CausalLM

    config = dataclasses.replace(e2e_prefill.TINY, num_layers=3)
    eager = e2e_prefill.build_model(config, jnp.bfloat16, structured=False)
    jitted = nnx.jit(lambda: CausalLM(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))()
    pairs = zip(jax.tree.leaves(nnx.state(eager)), jax.tree.leaves(nnx.state(jitted)), strict=True)
    assert all(bool(jnp.array_equal(a, b)) for a, b in pairs)


def test_speedup_ceiling_arithmetic():
    from benchmarks.e2e_prefill import speedup_ceiling

    dense = dict(layer0_ms=300.0, share_attention_kernel=0.7)  # 210 ms cuDNN
    sparse = dict(
        layer0_ms=200.0,
        share_index=0.01,
        share_projections_mlp=0.45,  # 2 + 90 ms
        layer0_computed_fraction=0.1,  # 21 ms at cuDNN's rate
    )
    assert abs(speedup_ceiling(sparse, dense) - 300.0 / 113.0) < 1e-9
    assert speedup_ceiling(dict(sparse, layer0_computed_fraction=None), dense) is None
    assert speedup_ceiling(sparse, dict(full_model_s=1.0)) is None


def test_structured_attention_makes_estimated_indices_sparse():
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.e2e_prefill import LLAMA3_8B
    from benchmarks.synthetic import structure_attention
    from minference_jax import VerticalSlash, build_sparse_index
    from minference_jax.models import CausalLM
    from minference_jax.models.rope import rope_tables

    config = dataclasses.replace(
        LLAMA3_8B,
        num_layers=1,
        attention_bias=True,
        vocab_size=512,
        hidden_size=512,
        intermediate_size=32,
        num_heads=4,
        num_kv_heads=2,
    )
    n = 4096
    ids = jax.random.randint(jax.random.PRNGKey(0), (1, n), 1, 512).at[0, 0].set(0)
    cos, sin = rope_tables(config, jnp.arange(n), n)
    fractions = []
    for structured in (False, True):
        model = CausalLM(config, rngs=nnx.Rngs(0))
        if structured:
            structure_attention(model)
        layer = model.layers[0]
        q, k, _ = layer.attn.qkv(layer.input_norm(model.embed[...][ids]), cos, sin)
        index = build_sparse_index(q, k, VerticalSlash(64, 256))
        fractions.append(float(index.computed_fraction()))
    assert fractions[1] < 0.6 * fractions[0], fractions


def test_niah_benchmark_smoke(tmp_path):
    from benchmarks import niah

    argv = ["--lengths", "512", "--depths", "0", "1", "--samples", "2", "--ppl-docs", "1"]
    modes = ["dense", "minference", "ashape:16,64"]
    rows = niah.main([*argv, "--modes", *modes, "--out", str(tmp_path)])
    cells = [r for r in rows if r["kind"] == "niah"]
    assert len(cells) == 6 and all(r["samples"] == 2 for r in cells)
    assert all(r["correct"] == 2 for r in cells if r["mode"] != "ashape:16,64")  # it answers
    ppl = {r["mode"]: r for r in rows if r["kind"] == "ppl"}
    assert (
        1.0 < ppl["dense"]["ppl"] < 5.0
        and abs(ppl["minference"]["ppl"] / ppl["dense"]["ppl"] - 1) < 0.1
    )
    # A-shape 16 + 64 of 512 tokens: the sink tile and two local tiles of 36 causal 64-tiles
    assert ppl["dense"]["computed_fraction"] == 1.0
    assert 0.1 < ppl["ashape:16,64"]["computed_fraction"] < 0.75
    report = next(tmp_path.glob("*.md")).read_text()
    assert "| dense | 100.0% | 100.0% | +0.0 |" in report and "AShape(16, 64)" in report
    assert next(tmp_path.glob("*.png")).stat().st_size > 1000


def test_niah_tick_labels_and_bad_mode():
    from benchmarks import niah

    labels = [niah.tokens_label(n) for n in (128, 512, 1536, 2048, 32768)]
    assert labels == ["128", "512", "1.5K", "2K", "32K"]
    with pytest.raises(SystemExit, match="unknown mode 'vs:1'"):
        niah.main(["--modes", "vs:1", "--lengths", "256"])


def test_training_script_smoke(tmp_path):
    from benchmarks import train_tiny_longctx
    from convert.checkpoint import load_model

    argv = ["--out", str(tmp_path), "--steps", "2", "--lengths", "128", "--tokens-per-step", "256"]
    train_tiny_longctx.main([*argv, "--log-every", "1"])
    log = json.loads((tmp_path / "training_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2] and all(r["lm_loss"] > 0 for r in log)
    model, config = load_model(tmp_path)
    assert config.num_layers == 2 and (tmp_path / "tokenizer.json").is_file()


def test_slash_tiling_counts_by_hand():
    import numpy as np

    from benchmarks.slash_tiling import diagonal_tile_fractions, main
    from minference_jax.sparse_index import SENTINEL

    # 8 query blocks of 64 (36 causal tiles). Slashes 100 and 150 cover distances 100..213:
    # aligned blocks 1, 2, 3 (+ the diagonal 0); unaligned tiles at 100 and 164 (+ 0).
    aligned, unaligned = diagonal_tile_fractions(np.array([100, 150, SENTINEL]), 512, 64)
    assert aligned == (1 + 2 + 3 + 5 * 4) / 36 and unaligned == (1 + 2 + 3 + 5 * 3) / 36
    rows = main(["--tiny", "--seq-len", "256"])
    assert rows and all(0 < r["unaligned"] <= r["aligned"] <= 1 for r in rows)
