"""The benchmark scripts run (tiny sizes, CPU), write where they say, say what device they need
and refuse CPU runs they cannot finish; the docs state what the code does, in user terms."""

import argparse
import json
import pathlib
import re

import jax
import jax.numpy as jnp
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


def test_index_benchmark_times_every_estimator_on_the_same_inputs(tmp_path):
    from benchmarks import index_approx

    argv = ["--seq-lens", "600", "--heads", "4", "--kv-heads", "2", "--head-dim", "32"]
    argv += ["--pattern", "sbs:0.003", "--inputs", "structured", "--dtype", "float32"]
    rows = index_approx.main([*argv, "--estimator", "xla", "pallas", "--out", str(tmp_path)])
    assert [r["estimator"] for r in rows] == ["xla", "pallas"]
    # Both scorers give the same index (the kernel's own tests check its scores).
    assert all(r["same_tiles"] == 1.0 for r in rows)
    assert rows[0]["computed_fraction"] == rows[1]["computed_fraction"]
    assert rows[0]["blocks"] == "64x64" and rows[0]["dense_ms"] is None  # CPU: no cuDNN
    (table,) = tmp_path.glob("index_approx_*_xla_pallas.md")
    assert "| 600 | pallas |" in table.read_text()


def test_index_benchmark_reads_a_dumped_layer(tmp_path):
    from benchmarks import index_approx
    from benchmarks.dump_qkv import save_qkv

    kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(kq, (1, 400, 6, 32), jnp.float32)
    k, v = (jax.random.normal(key, (1, 400, 2, 32), jnp.float32) for key in (kk, kv))
    save_qkv(tmp_path / "layer.npz", q, k, v)
    argv = ["--dump", str(tmp_path / "layer.npz"), "--pattern", "vs:30,100", "--repeats", "1"]
    (row,) = index_approx.main([*argv, "--out", str(tmp_path)])
    # The dump's shapes replace the defaults (16384 tokens, 32 / 8 heads, d 128, bf16).
    assert (row["seq_len"], row["heads"], row["kv_heads"]) == (400, 6, 2)
    assert (row["head_dim"], row["dtype"], row["inputs"]) == (32, "float32", "dumped (layer.npz)")


def test_index_profile_runs_every_stage(tmp_path, capsys):
    from benchmarks import profile_index

    argv = ["--seq-len", "256", "--heads", "4", "--kv-heads", "2", "--repeats", "1"]
    rows = profile_index.main([*argv, "--out", str(tmp_path)])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" ms")]
    assert len(lines) == len(rows) == 9 and any("pallas" in line for line in lines)
    (table,) = tmp_path.glob("profile_index_*.md")
    assert all(f"| {r['stage']} | {r['ms']:.3f} |" in table.read_text() for r in rows)
    assert json.loads(table.with_suffix(".json").read_text()) == rows


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


def test_layer_shares_never_negative_when_separate_timings_disagree(capsys):
    from benchmarks.e2e_prefill import part_shares

    consistent = part_shares(layer_ms=10.0, attention_ms=6.0, index_ms=1.0)
    assert consistent == {
        "share_index": 0.1,
        "share_attention_kernel": 0.5,
        "share_projections_mlp": 0.4,
    }
    assert capsys.readouterr().err == ""
    # attention timed alone took longer than the whole layer (a busy host): no negative share
    noisy = part_shares(layer_ms=12.0, attention_ms=18.0, index_ms=2.6)
    assert noisy["share_projections_mlp"] == 0 and min(noisy.values()) >= 0
    assert abs(sum(noisy.values()) - 1) < 1e-2
    assert "share_projections_mlp set to 0" in capsys.readouterr().err


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


def test_slash_tiling_counts_by_hand(tmp_path):
    import numpy as np

    from benchmarks.slash_tiling import diagonal_tile_fractions, main
    from minference_jax.sparse_index import SENTINEL

    # 8 query blocks of 64 (36 causal tiles). Slashes 100 and 150 cover distances 100..213:
    # aligned blocks 1, 2, 3 (+ the diagonal 0); unaligned tiles at 100 and 164 (+ 0).
    aligned, unaligned = diagonal_tile_fractions(np.array([100, 150, SENTINEL]), 512, 64)
    assert aligned == (1 + 2 + 3 + 5 * 4) / 36 and unaligned == (1 + 2 + 3 + 5 * 3) / 36
    rows = main(["--tiny", "--seq-len", "256", "--out", str(tmp_path)])
    assert rows and all(0 < r["unaligned"] <= r["aligned"] <= 1 for r in rows)
    table = (tmp_path / "slash_tiling_256_tiny.md").read_text()
    assert all(f"| {r['head']} | {r['pattern']} |" in table for r in rows)


# --- What each benchmark needs, and the CPU runs it refuses --------------------------------

BENCHMARKS = sorted(
    path.stem for path in (ROOT / "benchmarks").glob("*.py") if "\ndef main(" in path.read_text()
)


def test_every_benchmark_says_in_its_help_and_the_readme_what_device_it_needs(capsys):
    import importlib

    from benchmarks.device_guard import LIMITS, NEEDS_NO_GPU

    assert len(BENCHMARKS) >= 15 and set(BENCHMARKS) == set(LIMITS) | NEEDS_NO_GPU
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Benchmarks\n") : readme.index("## License\n")]
    bullets = {}
    for bullet in section.split("\n- ")[1:]:
        (name,) = re.findall(r"^`\.venv/bin/python -m benchmarks\.(\w+)", bullet)
        bullets[name] = " ".join(bullet.split())
    for name in BENCHMARKS:
        with pytest.raises(SystemExit) as done:
            importlib.import_module(f"benchmarks.{name}").main(["--help"])
        assert done.value.code == 0
        help_text = "".join(capsys.readouterr().out.split())  # argparse wraps at any space, "-"
        if name in NEEDS_NO_GPU:
            assert "Device:needsnoGPU." in help_text
            marker = "(no GPU"
        else:
            limits = LIMITS[name]
            assert "".join(f"On a CPU {limits.cpu};".split()) in help_text, name
            assert "--allow-cpu" in help_text
            marker = "(GPU" if limits.gpu else "(CPU"
        assert marker in bullets[name], f"README's benchmark list: {name} is not marked {marker})"


def _guarded_parser(name: str, *flags: tuple[str, dict]) -> argparse.ArgumentParser:
    from benchmarks.device_guard import declare

    parser = argparse.ArgumentParser()
    for flag, kwargs in flags:
        parser.add_argument(flag, **kwargs)
    declare(parser, name)
    return parser


def test_device_guard_refuses_what_a_cpu_cannot_finish_at_once(monkeypatch, capsys):
    import jax

    from benchmarks import device_guard

    seq_lens = ("--seq-lens", dict(type=int, nargs="+", default=[4096]))
    parser = _guarded_parser("index_approx", seq_lens)
    assert parser.parse_args(["--seq-lens", "300", "32768"]).seq_lens == [300, 32768]
    for argv in (["--seq-lens", "32768", "131072"], ["--seq-lens", "524288"]):
        with pytest.raises(SystemExit) as refused:
            parser.parse_args(argv)
        (line,) = capsys.readouterr().err.splitlines()  # one line, naming limit and override
        assert refused.value.code == 2 and "over the CPU limit of 32768" in line
        assert "--allow-cpu" in line and line.startswith("benchmarks.index_approx: ")
    assert parser.parse_args(["--seq-lens", "524288", "--allow-cpu"]).allow_cpu
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # a GPU runs every size
    assert parser.parse_args(["--seq-lens", "1048576"]).seq_lens == [1048576]
    monkeypatch.undo()

    # Memory, not a length: 20 NIAH prompts x 4 heads of dense f32 scores at 8K are 43 GB whole
    # (XLA called directly), 2 GB in the query slices the library's dense path takes.
    whole = device_guard.dense_attention_bytes(20, 4, 8192, sliced=False)
    assert whole == pytest.approx(43e9, rel=0.01)
    assert device_guard.dense_attention_bytes(20, 4, 8192) == pytest.approx(2.0e9, rel=0.01)
    from benchmarks import niah

    monkeypatch.setattr(device_guard, "host_memory_bytes", lambda: 2**30)  # a 1 GiB host
    with pytest.raises(SystemExit):
        niah.main(["--lengths", "2048", "4096", "8192"])  # refused before the model loads
    assert "dense attention at 8192 tokens (20 prompts x 4 heads) needs about 2 GB" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit, match="unknown mode"):  # no dense mode: nothing to refuse
        niah.main(["--lengths", "8192", "--modes", "vs:1"])

    from benchmarks import kernels, mgpu_sweep

    for main, argv, reason in (
        (kernels.main, ["--seq-lens", "128"], "runs there only with --interpret"),
        (kernels.main, ["--seq-lens", "8192", "--interpret"], "over the CPU limit of 4096"),
        (mgpu_sweep.main, [], "needs an NVIDIA H100 or H200"),
    ):
        with pytest.raises(SystemExit) as refused:
            main(argv)
        assert refused.value.code == 2 and reason in capsys.readouterr().err


# --- Figures redrawn from their JSON -----------------------------------------------------------

RESULTS = ROOT / "benchmarks" / "results"


def test_shipped_figures_redraw_from_their_json(tmp_path):
    from benchmarks import e2e_prefill, niah, real_model, recall

    runs = [
        (e2e_prefill, ["e2e_prefill_H200_mosaic_default", "e2e_prefill_H200_mosaic_1m"]),
        (niah, ["pytext_12m/niah_H200", "pytext_12m/niah_H200_4k_16k"]),
        (recall, ["recall_cpu_8k"]),
        (real_model, ["qwen2_5_coder_1_5b/real_model_H200_64k_128k"]),
    ]
    for module, stems in runs:
        paths = [str(RESULTS / f"{stem}.json") for stem in stems]
        name = ["--name", module.__name__.split(".")[-1]] if len(paths) > 1 else []
        assert module.main(["--replot", *paths, *name, "--out", str(tmp_path)]) == []
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == sorted(
        ["e2e_prefill.png", "niah.png", "recall_cpu_8k.png", "real_model_H200_64k_128k.png"]
    )
    assert all(p.stat().st_size > 20_000 for p in tmp_path.glob("*.png"))


def test_e2e_plot_names_modes_card_and_extrapolation():
    from benchmarks import e2e_prefill
    from benchmarks.timing import card_name, tokens_label

    rows = [
        row
        for stem in ("e2e_prefill_H200_mosaic_default", "e2e_prefill_H200_mosaic_1m")
        for row in json.loads((RESULTS / f"{stem}.json").read_text())
    ]
    assert e2e_prefill.extrapolation(rows, 32) == (
        "\n32-layer times extrapolated from 2 layers at 128K, 512K and 1 layer at 1M run"
    )
    assert e2e_prefill.extrapolation([dict(r, extrapolated=False) for r in rows], 32) == ""
    assert e2e_prefill.mode_label("config").startswith("config (minference): the shipped")
    assert e2e_prefill.mode_label("adaptive-vs:0.95") == (
        "adaptive-vs:0.95: every head AdaptiveVerticalSlash, threshold 0.95"
    )
    assert card_name(rows[0]["device"]) == "NVIDIA H200" and card_name("cpu:cpu") == "CPU"
    assert [tokens_label(n) for n in (1536, 131072, 1 << 20)] == ["1.5K", "128K", "1M"]


# --- The docs state what the code does ----------------------------------------------------------

DOCS = ("README.md", "benchmarks/RESULTS.md", "benchmarks/NOTES.md", "docs/design.md")


def _prose(doc: str) -> str:
    """The doc's text outside code blocks, on one line."""
    text = re.sub(r"```.*?```", "", (ROOT / doc).read_text(), flags=re.S)
    return " ".join(text.split())


def _dispatch_claims() -> list[tuple[str, str, tuple]]:
    """(doc, pattern, the values its groups must read): what the docs say about the dispatch."""
    from minference_jax import attention as A

    short = A.SHORT_PROMPT_TOKENS
    fraction = A.dense_fallback_fraction
    crossover_k = A.DENSE_CROSSOVER_TOKENS // 1024
    pct = lambda f: round(100 * f)  # noqa: E731
    return [
        ("README.md", r"on GPU prompts of at most (\d+)K tokens, go to", (crossover_k,)),
        ("README.md", r"Up to (\d+)K tokens the library runs dense cuDNN itself", (crossover_k,)),
        (
            "README.md",
            r"up to (\d+)K tokens ([\d.]+) for the Mosaic kernel and ([\d.]+) for Triton; "
            r"above, ([\d.]+) and ([\d.]+)\)",
            (
                short // 1024,
                fraction(short, "mosaic"),
                fraction(short, "pallas"),
                fraction(short + 1, "mosaic"),
                fraction(short + 1, "pallas"),
            ),
        ),
        (
            "benchmarks/RESULTS.md",
            r"Up to (\d+)K tokens the library runs cuDNN itself",
            (crossover_k,),
        ),
        ("benchmarks/RESULTS.md", r"cuDNN for prompts <= (\d+)K on GPU", (crossover_k,)),
        (
            "benchmarks/RESULTS.md",
            r"sends prompts <= (\d+)K to cuDNN and, up to (\d+)K, each layer whose index computes "
            r"more than (\d+)% of the tiles \(Mosaic kernel; (\d+)% for Triton\)",
            (
                crossover_k,
                short // 1024,
                pct(fraction(short, "mosaic")),
                pct(fraction(short, "pallas")),
            ),
        ),
        (
            "benchmarks/RESULTS.md",
            r"runs the Mosaic kernel up to (\d+)% of the tiles at <= (\d+)K",
            (pct(fraction(short, "mosaic")), short // 1024),
        ),
        (
            "benchmarks/NOTES.md",
            r"`SHARED_WIDTHS_MAX_TOKENS` = (\d+)K",
            (A.SHARED_WIDTHS_MAX_TOKENS // 1024,),
        ),
    ]


def test_dispatch_numbers_in_the_docs_are_read_from_the_code():
    for doc, pattern, expected in _dispatch_claims():
        found = re.findall(pattern, _prose(doc))
        assert found, f"{doc} no longer says {pattern!r}: update the claim here"
        for groups in found:
            groups = groups if isinstance(groups, tuple) else (groups,)
            read = tuple(type(want)(got) for got, want in zip(groups, expected, strict=True))
            assert read == expected, f"{doc}: {pattern!r} reads {read}, the code has {expected}"


# Backticked names the docs cite that are not code: environment variables, a config's fields,
# HF config.json keys, keyword arguments, benchmark case names.
NOT_CODE = {
    "MINFERENCE_JAX_CACHE",
    "MINFERENCE_JAX_CHECK_CAPACITY",
    "NPROC",
    "PJRT_NPROC",
    "PYTEST_ADDOPTS",
    "XLA_FLAGS",
}
ALIASES = {
    "lax": "jax.lax",
    "nnx": "flax.nnx",
    "pl": "jax.experimental.pallas",
    "plgpu": "jax.experimental.pallas.mosaic_gpu",
}
PACKAGES = ("minference_jax", "pallas_kernels", "convert", "benchmarks")


def _project_modules() -> list:
    import importlib
    import pkgutil

    modules = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        modules.append(module)
        for info in pkgutil.walk_packages(module.__path__, package + "."):
            modules.append(importlib.import_module(info.name))
    return modules


def _resolves(name: str, modules: list) -> bool:
    """`a.b.c` imports (as written, or inside one of our packages) with attributes b, c...; a
    bare first name is looked up in every module of ours (or jax's top level), a bare `name()`
    also among our classes' methods."""
    import builtins
    import importlib

    import jax

    head, *rest = name.split(".")
    parts = [*ALIASES.get(head, head).split("."), *rest]
    for prefix in ("", *(f"{p}." for p in PACKAGES), "minference_jax.models."):
        for cut in range(len(parts), 0, -1):
            try:
                found = importlib.import_module(prefix + ".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for attr in parts[cut:]:
                    found = getattr(found, attr)
                return True
            except AttributeError:
                break
    for owner in [builtins, jax, *modules]:
        found = getattr(owner, parts[0], None)
        for attr in parts[1:]:
            found = getattr(found, attr, None)
        if found is not None:
            return True
    classes = [c for m in modules for c in vars(m).values() if isinstance(c, type)]
    return not rest and any(hasattr(c, head) for c in classes)  # a method of one of our classes


@pytest.mark.parametrize("doc", DOCS)
def test_code_names_the_docs_cite_exist(doc):
    """Every backticked `module.name`, `CONSTANT_NAME`, `ClassName` or `function(...)` of the
    doc's prose resolves in the code (file names and NOT_CODE aside)."""
    modules = _project_modules()
    cited = set()
    for name, call in re.findall(r"`([A-Za-z_][\w.]*)(\([^`]*\))?`", _prose(doc)):
        if re.search(r"\.(json|txt|md|py|log|gz|safetensors|gguf|npz|png|bin)$", name):
            continue  # a file
        dotted = "." in name
        constant = re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", name)
        class_name = re.fullmatch(r"[A-Z][a-z0-9]+[A-Z]\w*", name)
        if (dotted or constant or class_name or call) and name not in NOT_CODE:
            cited.add(name)
    assert len(cited) >= 5
    missing = sorted(name for name in cited if not _resolves(name, modules))
    assert not missing, f"{doc} cites names the code does not have: {missing}"
