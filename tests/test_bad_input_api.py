"""The Python API under bad input: converted checkpoints that disagree with their config or
metadata, an index used with inputs it was not built for, float16 on CPU, and the documented
block rounding of A-shape's local window."""

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

from convert.checkpoint import convert_folder
from minference_jax import (
    AShape,
    Dense,
    VerticalSlash,
    build_sparse_index,
    dense_attention_reference,
    dense_mask_from_index,
    sparse_attention,
    sparse_attention_reference,
    sparse_attention_xla,
)
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
    assert "unexpected tensors: layers.1." in load_error(folder)


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
        sparse_attention(q2, k2, v2, Dense(), implementation=implementation, index=batch_one_index)


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
        sparse_attention(q8, k8, v8, Dense(), index=index)
    relabelled = dataclasses.replace(index, block_q=64)  # arrays still cut for block_q=128
    with pytest.raises(ValueError, match=r"index.diag_count has shape \(1, 4, 1\), expected"):
        sparse_attention(q, k, v, Dense(), index=relabelled)
    with pytest.raises(ValueError, match="positive multiple"):
        sparse_attention(q, k, v, Dense(), index=dataclasses.replace(index, block_kv=48))


def test_matching_index_of_batch_two_still_runs():
    q, k, v = _qkv(2)
    index = build_sparse_index(q, k, AShape(16, 40))
    out = sparse_attention(q, k, v, Dense(), implementation="xla", index=index)
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
    out = sparse_attention(q, k, v, pattern, implementation=implementation)
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
