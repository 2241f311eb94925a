"""The Python API under bad input: converted checkpoints that disagree with their config or
metadata, an index used with inputs it was not built for, float16 on CPU, the documented
block rounding of A-shape's local window, and arguments the entry points refuse up front."""

import dataclasses
import json
import math
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert.checkpoint import convert_folder
from minference_jax import (
    AShape,
    Dense,
    VerticalSlash,
    build_sparse_index,
    dense_attention_reference,
    dense_mask_from_index,
    nnx_attention_fn,
    sparse_attention,
    sparse_attention_reference,
    sparse_attention_xla,
)
from minference_jax.index_approx import plan_index
from minference_jax.models.checkpoint import META_FILE, CheckpointError, load_model
from tests.oracles import rel_err

LLAMA = pathlib.Path(__file__).parent / "fixtures" / "hf" / "llama"
IDS = jnp.arange(40, dtype=jnp.int32)[None] % 256


@pytest.fixture(scope="module")
def converted_once(tmp_path_factory):
    dst = tmp_path_factory.mktemp("conv") / "llama"
    convert_folder(LLAMA, dst, "float32", progress=False)
    model, _ = load_model(dst)
    return dst, np.asarray(model(IDS))


@pytest.fixture
def converted(converted_once, tmp_path):
    """A fresh copy of a converted folder (tests edit it) and its logits."""
    dst, logits = converted_once
    folder = tmp_path / "conv"
    shutil.copytree(dst, folder)
    return folder, logits


def edit_json(path: pathlib.Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del data[key]
    path.write_text(json.dumps(data))


def as_version_1(folder: pathlib.Path):
    """What a conversion by an earlier release wrote: no per-tensor shapes or checksums."""
    edit_json(folder / META_FILE, version=1, tensors=None)


def load_error(folder) -> str:
    with pytest.raises(CheckpointError) as info:
        load_model(folder)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_converted_folder_records_every_tensor(converted):
    folder, _ = converted
    meta = json.loads((folder / META_FILE).read_text())
    assert meta["version"] == 2 and meta["dtype"] == "float32"
    assert "layers.1.attn.q_proj.kernel" in meta["tensors"]
    assert meta["tensors"]["embed"]["shape"] == [256, 64]


@pytest.mark.parametrize("version", [2, 1])
def test_config_with_fewer_layers_than_the_params_is_refused(converted, version):
    folder, _ = converted
    if version == 1:
        as_version_1(folder)
    edit_json(folder / "config.json", num_hidden_layers=1)
    assert "num_hidden_layers=1, the stored tensors hold 2 layers" in load_error(folder)


@pytest.mark.parametrize("version", [2, 1])
def test_config_with_other_sizes_than_the_params_is_refused(converted, version):
    folder, _ = converted
    if version == 1:
        as_version_1(folder)
    edit_json(folder / "config.json", intermediate_size=96)
    assert "mlp.up_proj.kernel: shape (64, 128), config expects (64, 96)" in load_error(folder)


def test_folder_from_an_older_conversion_still_loads(converted):
    folder, logits = converted
    as_version_1(folder)
    model, _ = load_model(folder)
    np.testing.assert_array_equal(np.asarray(model(IDS)), logits)


def test_changed_tensor_bytes_fail_the_checksum(converted):
    folder, logits = converted
    params = folder / "params.safetensors"
    data = bytearray(params.read_bytes())
    data[-3] ^= 0x40  # inside the last tensor's data
    params.write_bytes(bytes(data))
    assert "does not match its SHA-256" in load_error(folder)
    load_model(folder, verify_checksums=False)  # opted out: names, shapes and dtypes only
    as_version_1(folder)  # no record to check against: loads, with different weights
    model, _ = load_model(folder)
    assert not np.array_equal(np.asarray(model(IDS)), logits)


def test_tensor_record_that_disagrees_with_the_file(converted):
    folder, _ = converted
    meta = json.loads((folder / META_FILE).read_text())
    meta["tensors"]["embed"]["shape"] = [128, 64]
    (folder / META_FILE).write_text(json.dumps(meta))
    assert "embed: shape (256, 64), minference_jax.json records (128, 64)" in load_error(folder)
    del meta["tensors"]["embed"]
    (folder / META_FILE).write_text(json.dumps(meta))
    assert "differ from those minference_jax.json records: embed" in load_error(folder)


def test_stored_dtype_must_match_the_metadata(converted):
    folder, _ = converted
    edit_json(folder / META_FILE, dtype="bfloat16")
    assert "stored as float32, minference_jax.json says bfloat16" in load_error(folder)


@pytest.mark.parametrize(
    "content, pattern",
    [
        (b"\xff\xfe\x00\x01", "not readable JSON"),
        (b'{"format": "minference_jax.params", ', "not readable JSON"),
        (b"[]", "JSON object, got list"),
        (b'{"format": "other"}', "unknown format 'other'"),
        (b'{"format": "minference_jax.params", "version": 9, "dtype": "float32"}', "version 9"),
        (b'{"format": "minference_jax.params", "version": 1, "dtype": "float8"}', "dtype 'float8'"),
        (b'{"format": "minference_jax.params", "version": 1}', "unknown dtype None"),
        (b'{"format": "minference_jax.params", "version": 2, "dtype": "float32"}', '"tensors"'),
        (
            b'{"format": "minference_jax.params", "version": 2, "dtype": "float32", '
            b'"tensors": {"embed": {"shape": [256, 64], "sha256": "xyz"}}}',
            '"tensors" must map',
        ),
    ],
)
def test_corrupt_metadata_is_one_clear_error(converted, content, pattern):
    folder, _ = converted
    (folder / META_FILE).write_bytes(content)
    message = load_error(folder)
    assert META_FILE in message and pattern in message


def test_missing_params_file_or_folder(converted, tmp_path):
    folder, _ = converted
    (folder / "params.safetensors").unlink()
    assert "no params.safetensors" in load_error(folder)
    assert "not found" in load_error(tmp_path / "nowhere")


# --- an index used with inputs it was not built for --------------------------------------------


def _qkv(batch, n=100, heads=4, kv_heads=2, d=16, dtype=jnp.float32, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = ((batch, n, heads, d), (batch, n, kv_heads, d), (batch, n, kv_heads, d))
    return tuple(jax.random.normal(k, s, dtype) for k, s in zip(keys, shapes, strict=True))


IMPLEMENTATIONS = [None, "xla", "reference", "pallas"]


@pytest.fixture(scope="module")
def batch_one_index():
    q1, k1, _ = _qkv(1)
    return build_sparse_index(q1, k1, AShape(16, 40))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_index_of_another_batch_size_is_refused(batch_one_index, implementation):
    q2, k2, v2 = _qkv(2, seed=1)
    with pytest.raises(
        ValueError,
        match="index is for seq 100 x 4 heads x batch 1; inputs have seq 100 x 4 heads x batch 2",
    ):
        sparse_attention(
            q2, k2, v2, patterns=Dense(), implementation=implementation, index=batch_one_index
        )


@pytest.mark.parametrize("backend", [sparse_attention_xla, sparse_attention_reference])
def test_backends_called_directly_check_the_index_too(batch_one_index, backend):
    q2, k2, v2 = _qkv(2, seed=1)
    with pytest.raises(ValueError, match="index is for .* batch 1; inputs have .* batch 2"):
        backend(q2, k2, v2, batch_one_index)
    q3, k3, v3 = _qkv(1, n=90)
    with pytest.raises(
        ValueError, match="index is for seq 100 .*; inputs have seq 90 x 4 heads x batch 1"
    ):
        backend(q3, k3, v3, batch_one_index)


def test_index_of_other_heads_or_block_sizes_is_refused():
    q, k, v = _qkv(1)
    index = build_sparse_index(q, k, AShape(16, 40), block_q=128, block_kv=64)
    q8, k8, v8 = _qkv(1, heads=8)
    with pytest.raises(
        ValueError, match="seq 100 x 4 heads x batch 1; inputs have seq 100 x 8 heads"
    ):
        sparse_attention(q8, k8, v8, patterns=Dense(), index=index)
    relabelled = dataclasses.replace(index, block_q=64)  # arrays still cut for block_q=128
    with pytest.raises(ValueError, match=r"index.diag_count has shape \(1, 4, 1\), expected"):
        sparse_attention(q, k, v, patterns=Dense(), index=relabelled)
    with pytest.raises(ValueError, match="positive multiple"):
        sparse_attention(q, k, v, patterns=Dense(), index=dataclasses.replace(index, block_kv=48))


def test_matching_index_of_batch_two_still_runs():
    q, k, v = _qkv(2)
    index = build_sparse_index(q, k, AShape(16, 40))
    out = sparse_attention(q, k, v, patterns=Dense(), implementation="xla", index=index)
    assert rel_err(out, sparse_attention_reference(q, k, v, index)) < 1e-5


# --- float16 on CPU -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "implementation, pattern",
    [
        (None, Dense()),
        ("xla", Dense()),
        ("reference", Dense()),
        (None, AShape(16, 40)),
        ("xla", VerticalSlash(30, 50)),
        ("reference", AShape(16, 40)),
    ],
)
def test_float16_runs_on_cpu_and_matches_float32(implementation, pattern):
    q, k, v = _qkv(2, dtype=jnp.float16)
    out = sparse_attention(q, k, v, patterns=pattern, implementation=implementation)
    assert out.dtype == jnp.float16 and out.shape == q.shape
    f32 = tuple(x.astype(jnp.float32) for x in (q, k, v))
    if isinstance(pattern, Dense):
        ref = dense_attention_reference(*f32)
    else:
        ref = sparse_attention_reference(*f32, build_sparse_index(*f32[:2], pattern))
    assert rel_err(out.astype(jnp.float32), ref) < 5e-3


def test_float16_model_forward_on_cpu(converted_once):
    folder, logits = converted_once
    model, _ = load_model(folder, jnp.float16)
    out = np.asarray(model(IDS), np.float32)
    assert np.isfinite(out).all() and rel_err(out, logits) < 2e-2


# --- A-shape's local window is rounded up to whole key blocks ---------------------------------


def ashape_block_mask(n_init, n_local, n, block_q, block_kv):
    """The documented mask: exact sinks; the window from a whole number of key blocks before the
    query's block."""
    rows, cols = np.arange(n)[:, None], np.arange(n)[None, :]
    blocks_before = math.ceil(max(min(n_local, n) - 1, 0) / block_kv)
    first = rows // block_q * block_q - blocks_before * block_kv
    return (cols <= rows) & ((cols < min(n_init, n)) | (cols >= first))


@pytest.mark.parametrize(
    "n_init, n_local, n, block_q, block_kv",
    [
        (16, 40, 256, 64, 64),
        (70, 100, 300, 128, 64),
        (0, 1, 130, 64, 32),
        (3, 500, 200, 64, 64),
        (64, 65, 257, 64, 64),
    ],
)
def test_ashape_window_is_block_rounded(n_init, n_local, n, block_q, block_kv):
    q, k, _ = _qkv(1, n=n, seed=n)
    index = build_sparse_index(q, k, AShape(n_init, n_local), block_q=block_q, block_kv=block_kv)
    mask = np.asarray(dense_mask_from_index(index))
    expected = ashape_block_mask(n_init, n_local, n, block_q, block_kv)
    np.testing.assert_array_equal(mask, np.broadcast_to(expected, mask.shape))
    rows, cols = np.arange(n)[:, None], np.arange(n)[None, :]
    exact = (cols <= rows) & ((cols < n_init) | (rows - cols < n_local))
    assert not (exact & ~expected).any()  # a superset of the token-exact window


def test_ashape_rounding_counts_of_the_docstring():
    expected = ashape_block_mask(16, 40, 256, 64, 64)
    rows, cols = np.arange(256)[:, None], np.arange(256)[None, :]
    exact = (cols <= rows) & ((cols < 16) | (rows - cols < 40))
    assert (int(expected.sum()), int(exact.sum())) == (22656, 12796)


def test_the_library_never_imports_the_converter():
    """`convert` builds on the models; the library loads checkpoints without it."""
    package = pathlib.Path(__file__).parents[1] / "minference_jax"
    importing = re.compile(r"^\s*(from|import)\s+convert\b", re.MULTILINE)
    offenders = [p.name for p in package.rglob("*.py") if importing.search(p.read_text())]
    assert offenders == []


# --- arguments the public entry points refuse up front ------------------------------------------


def _build_index(q, k, v, *, patterns, scale=None, **options):
    """build_sparse_index with sparse_attention's arguments (it reads no v)."""
    return build_sparse_index(q, k, patterns, softmax_scale=scale, **options)


ENTRY_POINTS = [sparse_attention, _build_index]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    "scale, message",
    [
        (float("nan"), "finite and > 0, got nan"),
        (float("inf"), "finite and > 0, got inf"),
        (-float("inf"), "finite and > 0, got -inf"),
        (0.0, "finite and > 0, got 0.0"),
        (-0.5, "finite and > 0, got -0.5"),
        (1e300, "too large for head_dim 16: at most 1.47e\\+37"),
        (1e-60, "rounds to 0 in float32"),
    ],
)
def test_softmax_scale_out_of_range_is_refused(entry, scale, message):
    q, k, v = _qkv(1)
    with pytest.raises(ValueError, match=message):
        entry(q, k, v, patterns=VerticalSlash(30, 50), scale=scale)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_softmax_scale_of_the_wrong_kind_is_refused(entry):
    q, k, v = _qkv(1)
    with pytest.raises(TypeError, match="scale must be a real number, got str"):
        entry(q, k, v, patterns=VerticalSlash(30, 50), scale="0.1")
    with pytest.raises(TypeError, match="not a traced value"):
        jax.jit(lambda s: entry(q, k, v, patterns=VerticalSlash(30, 50), scale=s))(0.1)


@pytest.mark.parametrize("scale", [1e-30, 1.0, 1e30, np.float32(0.25), jnp.float32(0.25), 2])
def test_finite_positive_softmax_scales_are_accepted(scale):
    q, k, v = _qkv(1)
    out = sparse_attention(q, k, v, patterns=VerticalSlash(30, 50), scale=scale)
    assert out.shape == q.shape and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize(
    "option, message, error",
    [
        (dict(last_q=0), "last_q must be >= 1, got 0", ValueError),
        (dict(last_q=-1), "last_q must be >= 1, got -1", ValueError),
        (dict(last_q=2.5), "last_q must be an int, got float", TypeError),
        (dict(last_q=True), "last_q must be an int, got bool", TypeError),
        (dict(block_q=64.0), "block_q must be an int, got float", TypeError),
        (dict(block_q=0), "positive multiple", ValueError),
        (dict(estimator="cuda"), "unknown estimator 'cuda'", ValueError),
    ],
)
def test_build_sparse_index_refuses_bad_integer_arguments(option, message, error):
    q, k, _ = _qkv(1)
    with pytest.raises(error, match=message):
        build_sparse_index(q, k, Dense(), **option)  # Dense estimates nothing: checked anyway


def test_plan_index_refuses_bad_sizes():
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        plan_index(Dense(), 0, 4)
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        plan_index(Dense(), 100, 0)
    with pytest.raises(ValueError, match="last_q must be >= 1, got 0"):
        plan_index(VerticalSlash(30, 50), 100, 4, last_q=0)


def test_block_sizes_are_checked_where_the_layer_runs_dense():
    q, k, v = _qkv(1)
    with pytest.raises(ValueError, match="positive multiple"):
        sparse_attention(q, k, v, patterns=Dense(), block_q=0)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_batch_mismatch_between_q_and_k_is_refused(entry):
    q, _, _ = _qkv(1)
    _, k, v = _qkv(2)
    with pytest.raises(ValueError, match=r"q \(1, 100, 4, 16\) and k \(2, 100, 2, 16\) differ in"):
        entry(q, k, v, patterns=VerticalSlash(30, 50))


def test_batch_mismatch_between_k_and_v_is_refused():
    q, k, _ = _qkv(1)
    _, _, v = _qkv(2)
    with pytest.raises(ValueError, match="k and v shapes differ"):
        sparse_attention(q, k, v, patterns=VerticalSlash(30, 50))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_non_floating_inputs_are_refused(entry, dtype):
    q, k, v = (x.astype(dtype) for x in _qkv(1))
    with pytest.raises(TypeError, match=f"q has dtype {jnp.dtype(dtype)}; expected float32"):
        entry(q, k, v, patterns=VerticalSlash(30, 50))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_mixed_dtypes_are_refused(entry):
    q, k, v = _qkv(1)
    with pytest.raises(TypeError, match="dtypes differ: float32, bfloat16"):
        entry(q, k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), patterns=VerticalSlash(30, 50))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize(
    "sizes, message",
    [
        (dict(batch=0), "q has batch size 0"),
        (dict(batch=1, n=0), "empty sequence: q has seq length 0"),
        (dict(batch=1, heads=0, kv_heads=0), "q has query heads 0"),
        (dict(batch=1, kv_heads=0), "k has kv heads 0"),
        (dict(batch=1, d=0), "q has head_dim 0"),
    ],
)
def test_empty_dimensions_are_refused_by_name(entry, sizes, message):
    q, k, v = _qkv(**sizes)
    with pytest.raises(ValueError, match=message):
        entry(q, k, v, patterns=VerticalSlash(30, 50))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_python_lists_are_refused(entry):
    q, k, v = (np.asarray(x).tolist() for x in _qkv(1, n=8))
    with pytest.raises(TypeError, match="q must be a jax.Array or numpy array .* got list"):
        entry(q, k, v, patterns=Dense())


def test_numpy_arrays_are_accepted():
    q, k, v = (np.asarray(x) for x in _qkv(1))
    expected = sparse_attention(*map(jnp.asarray, (q, k, v)), patterns=AShape(16, 40))
    np.testing.assert_array_equal(sparse_attention(q, k, v, patterns=AShape(16, 40)), expected)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_kv_heads_must_divide_query_heads(entry):
    q, k, v = _qkv(1, heads=4, kv_heads=3)
    with pytest.raises(ValueError, match=r"kv heads \(3\) must divide query heads \(4\)"):
        entry(q, k, v, patterns=VerticalSlash(30, 50))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("patterns", ["dense", b"vs", 5, None, {"layer": Dense()}])
def test_patterns_of_the_wrong_kind_are_refused(entry, patterns):
    q, k, v = _qkv(1)
    with pytest.raises(
        TypeError, match="patterns must be a Pattern .* got " + type(patterns).__name__
    ):
        entry(q, k, v, patterns=patterns)


def test_nnx_attention_fn_refuses_bad_patterns_when_built():
    with pytest.raises(TypeError, match="patterns must be a Pattern .* got str"):
        nnx_attention_fn("dense")


def test_index_of_the_wrong_kind_is_refused():
    q, k, v = _qkv(1)
    with pytest.raises(TypeError, match="index must be a SparseIndex, got dict"):
        sparse_attention(q, k, v, patterns=Dense(), index={})


def test_nnx_decode_says_decoding_is_not_supported():
    layer = nnx.MultiHeadAttention(
        num_heads=2,
        in_features=16,
        attention_fn=nnx_attention_fn(AShape(4, 16)),
        decode=True,
        rngs=nnx.Rngs(0),
    )
    layer.init_cache((1, 64, 16))
    with pytest.raises(ValueError, match="prefill-only .* decode=True .* not supported"):
        layer(jnp.ones((1, 1, 16)), is_causal=True)
