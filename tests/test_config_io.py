import json

import pytest

from minference_jax import patterns as P
from minference_jax.config_io import (
    PatternConfigError,
    dump_pattern_config,
    load_pattern_config,
    parse_pattern_config,
    save_pattern_config,
    shipped_configs,
)

SHIPPED = {
    "Llama_3_8B_Instruct_262k_kv_out_v32_fit_o_best_pattern": (32, 32),
    "Llama_3.1_8B_Instruct_128k_kv_out_v32_fit_o_best_pattern": (32, 32),
    "Qwen2.5_7B_Instruct_128k_instruct_kv_out_v32_fit_o_best_pattern": (28, 28),
    "Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern": (32, 32),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_load(name):
    layers, heads = SHIPPED[name]
    patterns = load_pattern_config(shipped_configs()[name], num_layers=layers, num_heads=heads)
    assert (patterns.num_layers, patterns.num_heads) == (layers, heads)
    raw = json.loads(shipped_configs()[name].read_text())
    # Spot-check that entries map field by field.
    for layer_id in (0, layers - 1):
        for head in (0, heads - 1):
            kind, v, s, _ = raw[layer_id][str(head)]
            got = patterns[layer_id][head]
            expected = {"vertical_and_slash": P.VerticalSlash, "stream_llm": P.AShape}[kind](v, s)
            assert got == expected


def test_phi3_has_ashape_heads():
    patterns = load_pattern_config(
        shipped_configs()["Phi_3_mini_128k_instruct_kv_out_v32_fit_o_best_pattern"]
    )
    kinds = {type(p) for layer in patterns.layers for p in layer}
    assert kinds == {P.VerticalSlash, P.AShape}
    assert P.AShape(100, 800) in {p for layer in patterns.layers for p in layer}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs_round_trip(name, tmp_path):
    path = shipped_configs()[name]
    patterns, scores = parse_pattern_config(json.loads(path.read_text()))
    out = tmp_path / "round_trip.json"
    save_pattern_config(patterns, out, scores)
    assert json.loads(out.read_text()) == json.loads(path.read_text())
    assert load_pattern_config(out) == patterns


def test_mixed_patterns_round_trip(tmp_path):
    layer = (P.VerticalSlash(10, 20), P.AShape(4, 64), P.BlockSparse(7), P.Dense())
    patterns = P.HeadPatterns((layer, layer[::-1]))
    save_pattern_config(patterns, tmp_path / "c.json")
    assert load_pattern_config(tmp_path / "c.json") == patterns
    assert dump_pattern_config(patterns)[0]["2"] == ["block_sparse", 7, 0, 0.0]


def test_block_sparse_without_size_reads_as_reference_top_k():
    patterns, _ = parse_pattern_config([{"0": ["block_sparse", 0, 0, 1.0]}])
    assert patterns[0][0] == P.BlockSparse(100)


def _write(tmp_path, obj):
    path = tmp_path / "bad.json"
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


@pytest.mark.parametrize(
    "obj, message",
    [
        ([{"0": ["vertical_slash", 1, 2, 0.0]}], "unknown pattern type 'vertical_slash'"),
        ([{"0": ["vertical_and_slash", -1, 2, 0.0]}], "v_size must be >= 0"),
        ([{"0": ["vertical_and_slash", 1, 2.5, 0.0]}], "s_size must be an integer"),
        ([{"0": ["vertical_and_slash", 1, 2]}], "expected \\[type, v_size, s_size, score\\]"),
        ([{"0": ["stream_llm", 1, 2, "x"]}], "score must be a finite number"),
        (
            [
                {"0": ["stream_llm", 1, 2, 0]},
                {"0": ["stream_llm", 1, 2, 0], "1": ["stream_llm", 1, 2, 0]},
            ],
            "different head counts",
        ),
        ([{"0": ["stream_llm", 1, 2, 0], "2": ["stream_llm", 1, 2, 0]}], "numbered 0..1"),
        ([{"a": ["stream_llm", 1, 2, 0]}], "head keys must be integers"),
        ([], "non-empty JSON list"),
        ({"0": {}}, "non-empty JSON list"),
        ("[{", "not valid JSON"),
    ],
)
def test_malformed_configs_raise_clear_errors(tmp_path, obj, message):
    with pytest.raises(PatternConfigError, match=message):
        load_pattern_config(_write(tmp_path, obj))


def test_model_mismatch_is_reported(tmp_path):
    path = shipped_configs()["Qwen2.5_7B_Instruct_128k_instruct_kv_out_v32_fit_o_best_pattern"]
    with pytest.raises(PatternConfigError, match="28 layers x 28 heads, the model has 32 layers"):
        load_pattern_config(path, num_layers=32, num_heads=32)
    with pytest.raises(PatternConfigError, match="not found"):
        load_pattern_config(tmp_path / "missing.json")


def test_pattern_validation():
    with pytest.raises(ValueError, match="n_slash must be >= 0"):
        P.VerticalSlash(10, -1)
    with pytest.raises(TypeError, match="must be an int"):
        P.AShape(1.5, 3)
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        P.BlockSparse(0)
    with pytest.raises(ValueError, match="3 per-head patterns for 4 query heads"):
        P.normalize_layer_patterns([P.Dense()] * 3, 4)
    assert hash(P.VerticalSlash(1, 2)) == hash(P.VerticalSlash(1, 2))
    assert P.VerticalSlash(5, 20000).budgets(1000) == (30, 1000)
