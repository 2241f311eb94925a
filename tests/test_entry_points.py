"""Shipped configs and checkpoints by name from any folder, the shipped config matched to a model,
`minference_jax.load`, the search's defaults and labels, pattern specs and console scripts."""

import json
import pathlib
import shutil
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import minference_jax
from minference_jax import patterns as P
from minference_jax.config_io import PatternConfigError, load_pattern_config, shipped_configs
from minference_jax.models.checkpoint import CheckpointError, load_model
from minference_jax.models.defaults import CHECKPOINT, PASSKEY_TINY, default_prompt
from minference_jax.pattern_spec import (
    SPEC_KINDS,
    format_pattern_spec,
    parse_pattern_spec,
)
from minference_jax.shipped import (
    SHIPPED_FOR_MODELS,
    match_pattern_config,
    resolve_checkpoint,
    resolve_pattern_config,
    shipped_checkpoints,
)

ROOT = pathlib.Path(__file__).parent.parent
LLAMA = str(ROOT / "tests" / "fixtures" / "hf" / "llama")  # 2 layers x 4 heads, no tokenizer


def _one_line_error(capsys, main, argv) -> str:
    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


# --- names of shipped files ----------------------------------------------------------------


def test_shipped_config_by_name_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = shipped_configs()["pytext_12m_searched"]
    for text in (
        "pytext_12m_searched",
        "pytext_12m_searched.json",
        "minference_jax/configs/pytext_12m_searched.json",  # the docs' repository path
        "./minference_jax/configs/pytext_12m_searched.json",
    ):
        assert resolve_pattern_config(text) == expected, text
    assert shipped_checkpoints() == {"passkey-tiny": PASSKEY_TINY, "pytext-12m": CHECKPOINT}
    assert resolve_checkpoint("pytext-12m") == CHECKPOINT
    assert resolve_checkpoint("minference_jax/checkpoints/passkey-tiny/") == PASSKEY_TINY


def test_a_path_that_exists_wins_over_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pytext_12m_searched.json").write_text("[]")
    (tmp_path / "pytext-12m").mkdir()
    assert resolve_pattern_config("pytext_12m_searched.json") == pathlib.Path(
        "pytext_12m_searched.json"
    )
    assert resolve_pattern_config("pytext_12m_searched") == shipped_configs()["pytext_12m_searched"]
    assert resolve_checkpoint("pytext-12m") == pathlib.Path("pytext-12m")


def test_unknown_names_list_what_ships(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(PatternConfigError, match="nor the name of a shipped config") as err:
        resolve_pattern_config("pytext_12m")
    assert all(name in str(err.value) for name in shipped_configs())
    with pytest.raises(PatternConfigError, match="not found: elsewhere/pytext_12m_searched.json"):
        resolve_pattern_config("elsewhere/pytext_12m_searched.json")  # not the repo's folder
    with pytest.raises(CheckpointError, match=r"shipped model \(passkey-tiny, pytext-12m\)"):
        resolve_checkpoint("pytext")
    with pytest.raises(CheckpointError, match="a_file is a file"):
        resolve_checkpoint("a_file")


def test_prefill_takes_names_from_another_folder(tmp_path, monkeypatch, capsys):
    from minference_jax.prefill import main

    monkeypatch.chdir(tmp_path)
    argv = ["--model", "passkey-tiny", "--prompt", "x" * 200, "--max-new-tokens", "1"]
    assert main([*argv, "--pattern-config", "passkey_tiny_searched_recall90", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["patterns"] == "passkey_tiny_searched_recall90"
    assert report["model"].startswith("passkey-tiny (shipped: ")
    err = _one_line_error(capsys, main, [*argv, "--pattern-config", "nope", "--quiet"])
    assert "pattern config not found: nope" in err and "pytext_12m_searched" in err
    err = _one_line_error(capsys, main, ["--model", "nope", "--quiet"])
    assert "checkpoint folder not found: nope" in err and "pytext-12m" in err


def test_benchmarks_take_names_from_another_folder(tmp_path, monkeypatch):
    """niah / real_model (build_modes) and dump_qkv read --model and --pattern-config as
    prefill does: a shipped name from any folder, one-line errors otherwise."""
    import argparse

    from benchmarks.niah import build_modes, resolve_model_arg

    monkeypatch.chdir(tmp_path)
    assert resolve_model_arg(pathlib.Path("pytext-12m")) == CHECKPOINT
    with pytest.raises(SystemExit, match="checkpoint folder not found: nope"):
        resolve_model_arg(pathlib.Path("nope"))
    _, config = load_model(CHECKPOINT, jnp.float32)
    for given in ("pytext_12m_searched", "minference_jax/configs/pytext_12m_searched.json"):
        args = argparse.Namespace(
            modes=["minference"],
            pattern_config=pathlib.Path(given),
            model=CHECKPOINT,
            dtype="float32",
        )
        (mode,) = build_modes(args, config)
        assert mode.title == "config pytext_12m_searched"
    args.pattern_config = pathlib.Path("nope")
    with pytest.raises(SystemExit, match="pattern config not found: nope"):
        build_modes(args, config)


# --- the shipped config made for a model ----------------------------------------------------


def _checkpoint(tmp_path, folder: str, name_or_path: str | None = None) -> pathlib.Path:
    path = tmp_path / folder
    path.mkdir()
    config = {} if name_or_path is None else {"_name_or_path": name_or_path}
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(
    "folder, name_or_path, shape, expected",
    [
        ("x", "Qwen/Qwen2.5-7B-Instruct", ("qwen2", 28, 28), "Qwen2.5_7B"),
        ("x", "/models/Meta-Llama-3.1-8B-Instruct", ("llama", 32, 32), "Llama_3.1_8B"),
        ("x", "gradientai/Llama-3-8B-Instruct-Gradient-1048k", ("llama", 32, 32), "Llama_3_8B"),
        ("x", "microsoft/Phi-3-mini-128k-instruct", ("phi3", 32, 32), "Phi_3_mini"),
        ("qwen2.5-coder-1.5b-instruct-q4_k_m", None, ("qwen2", 28, 12), "qwen2_5_coder"),
        ("qwen-coder-1.5b", None, ("qwen2", 28, 12), "qwen2_5_coder"),
        ("pytext-12m", None, ("llama", 8, 6), "pytext_12m_searched"),
        # Names that must not match: another size, a base model, another version.
        ("x", "Qwen/Qwen2.5-72B-Instruct", ("qwen2", 80, 64), None),
        ("x", "meta-llama/Meta-Llama-3-8B-Instruct", ("llama", 32, 32), None),
        ("Qwen2.5-Coder-1.5B", None, ("qwen2", 28, 12), None),
        ("converted", None, ("llama", 32, 32), None),
    ],
)
def test_match_by_recorded_name(tmp_path, folder, name_or_path, shape, expected):
    match = match_pattern_config(_checkpoint(tmp_path, folder, name_or_path), *shape)
    if expected is None:
        assert match.config is None and "none is made for a model of the name" in match.reason
    else:
        assert match.config.startswith(expected), match
        assert match.path.is_file() and "matched by the" in match.reason


def test_a_matching_name_on_another_shape_is_refused(tmp_path):
    folder = _checkpoint(tmp_path, "x", "Qwen/Qwen2.5-7B-Instruct")
    match = match_pattern_config(folder, "qwen2", 24, 28)
    assert match.config is None
    assert "names Qwen2.5-7B-Instruct, but" in match.reason
    assert "this model is qwen2, 24 layers x 28 heads" in match.reason


def test_the_table_agrees_with_the_shipped_files():
    configs = shipped_configs()
    for entry in SHIPPED_FOR_MODELS:
        table = load_pattern_config(configs[entry.config])
        assert (table.num_layers, table.num_heads) == (entry.num_layers, entry.num_heads)
    for name, folder in shipped_checkpoints().items():
        config = json.loads((folder / "config.json").read_text())
        shape = (config["num_hidden_layers"], config["num_attention_heads"])
        match = match_pattern_config(folder, config["model_type"], *shape)
        assert match.config == f"{name.replace('-', '_')}_searched"


def test_prefill_matches_the_config_or_warns(capsys):
    from minference_jax.prefill import main

    argv = ["--synthetic-tokens", "100", "--max-new-tokens", "0", "--repeats", "0", "--json"]
    assert main(["--model", str(PASSKEY_TINY), *argv, "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["patterns"] == "passkey_tiny_searched"
    assert "matched by the folder name 'passkey-tiny'" in report["attention"]
    assert main(["--model", LLAMA, *argv]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["patterns"] == "VerticalSlash(n_vertical=1000, n_slash=6096)"
    warning = [line for line in captured.err.splitlines() if "no shipped pattern config" in line]
    assert len(warning) == 1 and "folder name 'llama'" in warning[0]
    assert "Running VerticalSlash(1000, 6096) on every head" in warning[0]


# --- minference_jax.load ----------------------------------------------------------------------


def test_load_picks_the_shipped_config_and_generates():
    lm = minference_jax.load("passkey-tiny")
    assert lm.patterns == load_pattern_config(shipped_configs()["passkey_tiny_searched"])
    assert lm.path == PASSKEY_TINY and "passkey_tiny_searched" in lm.attention
    text = lm.generate("The pass key is 123. " * 20, max_new_tokens=3)
    assert isinstance(text, str)
    ids = lm.encode("abc")
    assert ids.tolist() == [[97, 98, 99]]
    tokens = lm.generate(np.tile(ids, (1, 30)), max_new_tokens=2)
    assert tokens.shape == (1, 2)
    result = lm.prefill(ids)
    assert result.last_logits.shape == (1, lm.config.vocab_size)


def test_load_attention_choices():
    lm = minference_jax.load("passkey-tiny", attention="dense")
    assert lm.patterns is None and lm.attention == "dense on every head"
    lm = minference_jax.load("passkey-tiny", attention="a-shape:16,64")
    assert lm.patterns == P.HeadPatterns.uniform(P.AShape(16, 64), 2, 4)
    lm = minference_jax.load("passkey-tiny", attention=P.BlockSparse(4))
    assert set(lm.patterns[1]) == {P.BlockSparse(4)}
    lm = minference_jax.load("passkey-tiny", attention="adaptive-vs")
    assert set(lm.patterns[0]) == {P.pattern_for_mode("adaptive-vs")}
    lm = minference_jax.load(PASSKEY_TINY, pattern_config="passkey_tiny_searched_recall90")
    assert P.Dense() in lm.patterns[0]
    with pytest.raises(ValueError, match="pattern_config goes with attention='minference'"):
        minference_jax.load("passkey-tiny", "dense", pattern_config="passkey_tiny_searched")
    with pytest.raises(PatternConfigError, match="has 8 layers x 6 heads, the model has 2 layers"):
        minference_jax.load("passkey-tiny", pattern_config="pytext_12m_searched")
    with pytest.raises(ValueError, match="bad pattern 'sparse'"):
        minference_jax.load("passkey-tiny", attention="sparse")
    with pytest.raises(CheckpointError, match="not found: nope"):
        minference_jax.load("nope")


def test_load_warns_when_no_config_fits():
    with pytest.warns(UserWarning, match="no shipped pattern config fits this model"):
        lm = minference_jax.load(LLAMA)
    assert lm.tokenizer is None and lm.patterns[0][0] == P.VerticalSlash(1000, 6096)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        lm.encode("text")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        minference_jax.load(LLAMA, attention="vs:30,50")  # chosen: no warning


def test_every_pattern_class_is_exported():
    for kind in P.PATTERN_TYPES:
        assert getattr(minference_jax, kind.__name__) is kind
    assert {"load", "LoadedModel", "parse_pattern_spec"} <= set(minference_jax.__all__)


# --- pattern specs: one syntax for search, load and the prefill's mode names -----------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("minference:1000,6096", P.VerticalSlash(1000, 6096)),
        ("vertical-slash:30,128", P.VerticalSlash(30, 128)),
        ("a-shape:64,256", P.AShape(64, 256)),
        ("block-sparse:8", P.BlockSparse(8)),
        ("anti-diagonal:0.9,16", P.AntiDiagonalBlockSparse(0.9, 16)),
        ("adaptive-vs:0.95", P.AdaptiveVerticalSlash(0.95)),
        ("AVSR:0.01", P.AdaptiveVerticalSlash(0.01, rule="relative")),
    ],
)
def test_prefill_mode_names_are_spec_kinds(text, expected):
    assert parse_pattern_spec(text) == expected


@pytest.mark.parametrize(
    "pattern",
    [
        P.VerticalSlash(1000, 6096),
        P.AShape(64, 256),
        P.BlockSparse(8),
        P.AntiDiagonalBlockSparse(0.9, 16),
        P.AntiDiagonalBlockSparse(0.1, rule="relative"),
        P.AdaptiveVerticalSlash(0.95, query_aware=0.2),
        P.AdaptiveVerticalSlash(0.01, rule="relative"),
    ],
)
def test_spec_round_trip(pattern):
    assert parse_pattern_spec(format_pattern_spec(pattern)) == pattern


def test_unwritable_patterns_format_as_repr():
    assert format_pattern_spec(P.BlockSparse(8, 32)) == repr(P.BlockSparse(8, 32))
    assert format_pattern_spec(P.Dense()) == "Dense()"


@pytest.mark.parametrize(
    "text, message",
    [
        ("a-shape", "use vs|minference|vertical-slash:N_VERTICAL,N_SLASH"),
        ("dense:1", "use vs|"),
        ("a-shape:64", "use ashape|a-shape:N_INIT,N_LOCAL"),
        ("anti-diagonal:2", "threshold must be in [0, 1]"),
        ("vs:a,b", "expected comma-separated numbers"),
    ],
)
def test_bad_specs_say_what_is_expected(text, message):
    with pytest.raises(ValueError, match="bad pattern") as err:
        parse_pattern_spec(text)
    assert message in str(err.value)


# --- search: defaults, labels, flags ------------------------------------------------------------


def test_every_prefill_mode_is_a_spec_kind():
    from minference_jax import pattern_spec

    assert set(P.MODE_PATTERNS) <= set(pattern_spec._CANONICAL)
    for mode, (kind, _, default) in P.MODE_PATTERNS.items():
        spec = f"{mode}:{','.join(map(str, default))}"
        assert type(parse_pattern_spec(spec)) is kind, spec


def test_search_help_lists_every_kind():
    from minference_jax.search import build_parser

    text = build_parser().format_help()
    for name, kind in SPEC_KINDS.items():
        for alias in (name, *kind.aliases):
            assert alias in text, alias
    for flag in ("--quiet", "--dtype"):
        assert flag in text


def test_search_defaults_to_the_embedded_model_and_its_prompt(tmp_path, monkeypatch, capsys):
    """Without --model: pytext-12m in float32, searched on the prefill's default prompt."""
    from minference_jax import search

    seen = {}

    def fake_search(model, prompts, **kwargs):
        seen.update(model=model, prompts=prompts, candidates=kwargs["candidates"])
        raise SystemExit(0)  # the arguments are what this test checks

    monkeypatch.setattr(search, "search_patterns", fake_search)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        search.main(["--out", "c.json", "--candidates", "a-shape:64,256", "vs:30,128"])
    assert seen["model"].config.num_layers == 8 and seen["model"].dtype == np.float32
    (prompt,) = seen["prompts"]
    assert bytes(np.asarray(prompt, np.uint8)).decode() == default_prompt()
    assert seen["candidates"] == [P.AShape(64, 256), P.VerticalSlash(30, 128)]
    with pytest.raises(SystemExit):
        search.main(["--out", "c.json", "--model", "pytext-12m", "--dtype", "bfloat16"])
    assert seen["model"].dtype == np.dtype("bfloat16")
    assert [len(p) for p in seen["prompts"]] == [4096, 4096]  # --model: synthetic prompts


def test_search_progress_is_labelled_and_quiet_silences_it(tmp_path, capsys):
    from minference_jax.search import main

    out = tmp_path / "c.json"
    argv = ["--model", "passkey-tiny", "--out", str(out), "--synthetic-tokens", "128"]
    argv += ["--score-queries", "16", "--candidates", "a-shape:16,32", "vs:30,50"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    title = "prompt {}/2 (128 tokens): dense forward, scoring 2 candidates per head"
    assert lines[0] == title.format(1) and lines[3] == title.format(2)
    assert [line.split()[:2] for line in lines[1:3]] == [["layer", "1/2"], ["layer", "2/2"]]
    assert "nearly dense" in captured.err  # 128 tokens: two 64-token blocks, all computed
    assert "heads: " in captured.out and load_pattern_config(out).num_layers == 2
    assert main([*argv, "--quiet"]) == 0
    assert "layer" not in capsys.readouterr().err


def test_search_refuses_prompt_files_with_synthetic_tokens(capsys, tmp_path):
    from minference_jax.search import main

    prompt = tmp_path / "p.txt"
    prompt.write_text("text " * 40)
    argv = ["--out", str(tmp_path / "c.json"), "--prompt-file", str(prompt)]
    err = _one_line_error(capsys, main, [*argv, "--synthetic-tokens", "100"])
    assert "pass --prompt-file or --synthetic-tokens, not both" in err


def test_out_inside_the_embedded_checkpoint_is_refused(capsys):
    from minference_jax.search import main

    err = _one_line_error(capsys, main, ["--out", str(CHECKPOINT / "c.json")])
    assert f"is inside the checkpoint folder {CHECKPOINT}" in err


# --- console scripts ---------------------------------------------------------------------------


def test_usage_names_the_console_script(monkeypatch):
    from minference_jax import prefill, search

    monkeypatch.setattr(sys, "argv", ["/venv/bin/minference-search"])
    assert search.build_parser().prog == "minference-search"
    monkeypatch.setattr(sys, "argv", ["-m"])
    assert prefill.build_parser().prog == "python -m minference_jax.prefill"


@pytest.mark.skipif(shutil.which("minference-prefill") is None, reason="package not installed")
def test_installed_console_script_runs(tmp_path):
    import subprocess

    result = subprocess.run(
        ["minference-search", "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: minference-search")
