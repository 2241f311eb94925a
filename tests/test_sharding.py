"""Tensor-parallel prefill equals single-device prefill (CPU devices; GPU runs: benchmarks)."""

import itertools
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from minference_jax import AShape, BlockSparse, Dense, HeadPatterns, VerticalSlash
from minference_jax.models.sharding import (
    balanced_kv_order,
    balanced_placement,
    device_costs,
    head_tiles,
    kv_group_costs,
    placement_imbalance,
    query_order,
)

ROOT = pathlib.Path(__file__).parent.parent
WORKER = str(ROOT / "tests" / "sharding_worker.py")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_sharded_prefill_matches_single_device():
    """One process with 4 forced CPU devices, sharded over 2 and over 4 of them."""
    out = subprocess.run(
        [sys.executable, WORKER, "local", "4"],
        capture_output=True,
        text=True,
        env=_env(),
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["devices"] == 4
    for devices in ("2", "4"):
        part = report[devices]
        assert part["permuted_layers"] == 1  # the placement moved heads in one of the 2 layers
        keys = ["dense", "minference", "dense_cache", "minference_cache"]
        for key in keys + (["replicated"] if devices == "2" else []):
            assert part[key] <= 1e-5, (devices, key, part[key])


def test_head_tiles_hand_counted():
    # 640 tokens, 64-token blocks: 10 query blocks, 55 causal tiles.
    assert head_tiles(Dense(), 640) == 55
    assert head_tiles(BlockSparse(3), 640) == 1 + 2 + 3 * 8  # capped by causality early on
    assert head_tiles(AShape(64, 100), 640) == 1 + 2 + 3 * 8  # 1 sink + 2 window blocks
    assert head_tiles(VerticalSlash(30, 50), 640) == 1 + 2 * 9  # clamped to (30, 50): 2/block
    assert head_tiles(VerticalSlash(1000, 6096), 640) == 55  # budgets over N: dense
    assert head_tiles(BlockSparse(1), 1) == 1


def _brute_force_best(costs, devices):
    """Smallest largest-device cost over every split into equal-sized device sets."""

    def splits(groups):
        if not groups:
            yield ()
            return
        for chosen in itertools.combinations(groups, len(costs) // devices):
            rest = [g for g in groups if g not in chosen]
            for tail in splits(rest):
                yield (*chosen, *tail)

    return min(
        max(device_costs(costs, order, devices)) for order in splits(list(range(len(costs))))
    )


@pytest.mark.parametrize("devices", [2, 4])
def test_balanced_kv_order_is_optimal_and_keeps_groups(devices):
    rng = np.random.default_rng(devices)
    for trial in range(30):
        costs = [int(c) for c in rng.integers(1, 50, size=8)]
        if trial % 3 == 0:
            costs[:2] = [400, 380]  # two heavy groups the contiguous split puts together
        order = balanced_kv_order(costs, devices)
        assert sorted(order) == list(range(8))
        assert max(device_costs(costs, order, devices)) == _brute_force_best(costs, devices)
    even = [5] * 8
    assert balanced_kv_order(even, devices) == tuple(range(8))  # nothing to gain: no move


def test_balanced_kv_order_search_limit_never_worse_than_contiguous():
    costs = [int(c) for c in np.random.default_rng(0).integers(1, 1000, size=32)]
    order = balanced_kv_order(costs, 4, max_nodes=50)
    assert sorted(order) == list(range(32))
    contiguous = max(device_costs(costs, range(32), 4))
    assert max(device_costs(costs, order, 4)) <= contiguous
    with pytest.raises(ValueError, match="do not divide 8 kv heads"):
        balanced_kv_order([1] * 8, 3)


def test_placement_imbalance_of_a_table():
    heavy, light = VerticalSlash(1000, 6096), VerticalSlash(30, 50)
    layer = (heavy,) * 4 + (light,) * 4  # 4 kv groups of 2 q heads; heavy ones first
    table = HeadPatterns((layer, layer))
    n = 131072
    costs = kv_group_costs(layer, 4, n)
    assert costs[0] == costs[1] == 2 * head_tiles(heavy, n) and costs[2] == costs[3]
    before = placement_imbalance(table, 4, 2, n)
    assert before == pytest.approx(2 * costs[0] / (costs[0] + costs[2]))
    orders = balanced_placement(table, 4, 2, n)
    assert orders == ((0, 2, 1, 3),) * 2
    assert placement_imbalance(table, 4, 2, n, orders) == 1.0
    assert list(query_order((1, 0), 2)) == [2, 3, 0, 1]


def test_device_count_must_divide_kv_heads():
    from minference_jax.models import ModelConfig
    from minference_jax.models.sharding import check_divisible

    config = ModelConfig.from_hf_dict(
        dict(
            model_type="llama",
            vocab_size=8,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    check_divisible(config, 2)
    with pytest.raises(ValueError, match="divide the kv heads \\(2\\)"):
        check_divisible(config, 4)


def test_two_processes_with_jax_distributed():
    """Multi-host path: 2 local processes, 1 CPU device each, gloo collectives."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = str(s.getsockname()[1])
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, "host", str(pid), port],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for pid in (0, 1)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["devices"] == 2
        for key in ("dense", "minference"):
            assert report["2"][key] <= 1e-5, (key, report["2"][key])


def test_cli_tensor_parallel_over_local_devices():
    env = {
        **_env(),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
    }
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "minference_jax.prefill",
            "--tensor-parallel",
            "0",
            "--json",
            "--quiet",
            "--max-new-tokens",
            "2",
            "--model",  # the embedded default has one kv head: nothing to split
            str(ROOT / "tests" / "fixtures" / "hf" / "llama"),
            "--synthetic-tokens",
            "200",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout)["devices"] == 2


def test_e2e_benchmark_tensor_parallel_rows(tmp_path):
    """--tensor-parallel 1 2 with the A/B switch: scaling, spread and comm share columns."""
    env = {
        **_env(),
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2",
    }
    args = ["--tiny", "--seq-lens", "99", "--modes", "dense", "--tensor-parallel", "1", "2"]
    # Medians of 3: the comm share compares two wall times of a few ms on a busy CPU.
    args += ["--no-seq-parallel", "--no-balance", "--repeats", "3", "--no-breakdown"]
    args += ["--out", str(tmp_path)]  # dense: no contiguous rows (every head costs the same)
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.e2e_prefill", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert [(r["devices"], r.get("layout")) for r in rows] == [
        (1, None),
        (2, "balanced + seq-parallel"),
        (2, "balanced + all-reduce"),
    ]
    for row in rows[1:]:
        assert row["collectives_ms_per_layer"] > 0 and 0 < row["comm_share"] < 1
        assert row["index_tile_spread_est"] == row["cost_model_spread"] == 1.0  # dense: even
    table = next(tmp_path.glob("*.md")).read_text()
    assert "| balanced + all-reduce | 1.0 / 1.0 |" in table


def test_index_tile_spread_follows_the_placement():
    from types import SimpleNamespace

    from benchmarks.tp_stats import index_tile_spread

    heavy_first = np.array([8.0, 8.0, 8.0, 8.0, 1.0, 1.0, 1.0, 1.0])  # per query head, GQA 2
    even = np.ones(8)
    tiles = [heavy_first, None, even]  # the middle layer runs dense
    contiguous = SimpleNamespace(size=2, q_orders=None)
    assert index_tile_spread(tiles, contiguous) == round((32 + 4) / (18 + 4), 3)
    swap = query_order((0, 2, 1, 3), 2)
    balanced = SimpleNamespace(size=2, q_orders=[swap, None, swap])
    assert index_tile_spread(tiles, balanced) == 1.0
    assert index_tile_spread([None], balanced) == 1.0


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_pipelined_map_equals_the_plain_loop(steps):
    import jax.numpy as jnp

    from minference_jax.models.sequence_parallel import pipelined

    xs = jnp.arange(steps * 6.0).reshape(steps, 2, 3)
    out = pipelined(lambda i: xs[i] + 1, lambda a: (a * 2, a.sum()), lambda y: (y[0], -y[1]), steps)
    expected = [(2 * (xs[i] + 1), -(xs[i] + 1).sum()) for i in range(steps)]
    np.testing.assert_array_equal(out[0], np.stack([e[0] for e in expected]))
    np.testing.assert_array_equal(out[1], np.stack([e[1] for e in expected]))


@pytest.mark.parametrize(
    ("seq_len", "devices", "chunk"),
    [(301, 2, 64), (301, 4, 64), (16, 2, 8), (5, 4, 8192), (7, 2, 1)],
)
def test_sequence_layout_rows(seq_len, devices, chunk):
    """Every token has one row; one step's rows of every device form one prompt slice."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from minference_jax.models.sequence_parallel import sequence_layout
    from minference_jax.models.sharding import TensorParallel

    tp = SimpleNamespace(size=devices, sequence_parallel=True)
    rows, steps = sequence_layout(seq_len, devices, chunk)
    assert rows * devices <= max(chunk, devices) and (steps - 1) * rows * devices < seq_len
    tokens = jnp.arange(1.0, seq_len + 1)[None, :, None]  # token p carries p + 1; padding 0
    laid = np.asarray(TensorParallel.to_layout(tp, tokens, chunk))[0, :, 0]
    assert len(laid) == rows * steps * devices
    assert [laid[TensorParallel.layout_row(tp, p, seq_len, chunk)] for p in range(seq_len)] == [
        p + 1 for p in range(seq_len)
    ]
    per_device = laid.reshape(devices, steps, rows)
    gathered = per_device.transpose(1, 0, 2).reshape(-1)  # step by step, devices concatenated
    np.testing.assert_array_equal(gathered[:seq_len], np.arange(1, seq_len + 1))
    assert not gathered[seq_len:].any()


def test_index_tiles_by_layer_on_one_device():
    import dataclasses

    import jax
    import jax.numpy as jnp

    from benchmarks import e2e_prefill
    from benchmarks.tp_stats import index_tiles_by_layer

    config = dataclasses.replace(e2e_prefill.TINY, attention_bias=True)
    model = e2e_prefill.build_model(config, jnp.float32, structured=True)
    ids = jax.random.randint(jax.random.PRNGKey(1), (1, 200), 1, 64).at[0, 0].set(0)
    spec = e2e_prefill.attention_spec("config", model.config)
    tiles = index_tiles_by_layer(model, ids, spec, chunk=64)
    heads, blocks = model.config.num_heads, -(-200 // 64)
    assert len(tiles) == model.config.num_layers and all(t.shape == (heads,) for t in tiles)
    causal = blocks * (blocks + 1) // 2
    fraction = tiles[0].sum() / (causal * heads)
    assert fraction == pytest.approx(e2e_prefill.layer0_density(model, ids, spec), abs=1e-4)
    assert all(((1 <= t) & (t <= causal)).all() for t in tiles)
    dense = dataclasses.replace(spec, patterns=None)
    assert index_tiles_by_layer(model, ids, dense, chunk=64) == [None] * model.config.num_layers
