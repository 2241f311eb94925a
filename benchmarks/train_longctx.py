"""Train a small byte-level Llama on real text (Python sources and docs) up to 32K tokens.

    python -m benchmarks.train_longctx --out OUT --ckpt /tmp/ckpt --minutes 8.5  # GPU
    python -m benchmarks.train_longctx --tiny --out OUT --ckpt CKPT --steps 4 \\
        --corpus-root minference_jax                                             # CPU smoke

Model: our `CausalLM` (Llama architecture): 8 layers, hidden 384, 6 query / 2 kv heads of
head_dim 64, MLP 1024, RoPE theta 500000, vocabulary = UTF-8 bytes (ids 0..255), 12.8M
parameters. f32 master weights, bf16 compute with cuDNN flash attention on GPU (f32 on CPU).

Corpus (no network): the Python standard library, the installed packages (`purelib`) and man
pages (English sections), or the folders given with --corpus-root. Text files only (.py .pyi
.rst .md .txt, man *.gz decompressed), each cut to --max-file-kb, undecodable / NUL-containing
files skipped, exact duplicates dropped; files are read in the order of a hash of their path until
--max-corpus-mb or --max-corpus-seconds (the files read are listed in the outputs, so the corpus
can be rebuilt). A file is held out when a hash of its relative path says so (2%); training
documents are joined in path order (files of one package stay neighbours, so long windows hold
related code), each prefixed by its path and separated by a NUL byte.

Curriculum, by fraction of the time budget (or of --steps): windows of 2K tokens, then 8K, then
32K (--phases), at a constant number of tokens per step (one compile per phase). A fraction
--retrieval-rate of the rows ends with a passkey or multi-key retrieval document
(`minference_jax.passkey`, haystack = real text) whose answer loss is added with weight
--answer-weight; its length is drawn log-uniformly up to the phase's window, so retrieval starts
where the needle is close.

Optax AdamW (warmup, cosine to 10%, clipping at 1). Deterministic for a seed with --steps; with
--minutes (the wall budget of the run, counted once jax is imported) the phase switches and
learning rate follow the clock, and training stops --final-reserve seconds before the end for the
final evaluation and saving. A checkpoint (f32 params, optimizer state, step, data RNG state,
log; ~150 MB at the default size) is written to --ckpt every --ckpt-seconds, at the end and on
SIGTERM/SIGINT, together with the outputs; a run resumes from --ckpt when it holds one.
--init-from continues from an HF folder's weights with a fresh optimizer instead.

Outputs in --out (at most 7 files, each below 15 MiB): config.json, tokenizer.json,
model.safetensors.index.json and two weight shards (an HF folder: `convert.checkpoint.load_model`
reads it), training_log.json (per-step loss, learning rate, tokens, phase, held-out loss,
corpus manifest, throughput, final evaluation: held-out bits/byte at 2K and 8K, passkey accuracy
at 2K/8K/16K, multi-key at 2K/8K) and extras.tar (loss.png; heldout_text.jsonl.gz: up to 4 MB of
held-out files as {"path", "text"} lines; corpus_files.json.gz: every file read, with its split).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gzip
import hashlib
import io
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import sysconfig
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from benchmarks.device_guard import declare
from convert.checkpoint import export_hf, load_model, model_from_params
from convert.checkpoint import flat_params as checkpoint_params
from minference_jax import passkey
from minference_jax.models import CausalLM, ModelConfig
from minference_jax.models.config import read_hf_config
from minference_jax.tokenization import save_byte_tokenizer

PROCESS_START = time.perf_counter()

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 384,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 6,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}
TINY_HF_CONFIG = dict(
    HF_CONFIG,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=1024,
)


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str
    seq_len: int  # model inputs per row (rows hold seq_len + 1 tokens)
    batch: int
    until: float  # the phase ends at this fraction of the schedule


@dataclasses.dataclass(frozen=True)
class Setup:
    hf_config: dict
    phases: tuple[Phase, ...]
    eval_rows: int  # rows per evaluation batch
    eval_lengths: tuple[int, ...]  # held-out bits/byte
    passkey_lengths: tuple[int, ...]
    multikey_lengths: tuple[int, ...]
    min_retrieval: int  # shortest retrieval document (tokens)
    warmup_steps: int


FULL = Setup(
    hf_config=HF_CONFIG,
    phases=(
        Phase("2K", 2048, 64, 0.45),
        Phase("8K", 8192, 16, 0.75),
        Phase("32K", 32768, 4, 1.0),
    ),
    eval_rows=8,
    eval_lengths=(2048, 8192),
    passkey_lengths=(2048, 8192, 16384),
    multikey_lengths=(2048, 8192),
    min_retrieval=256,
    warmup_steps=150,
)
TINY = Setup(
    hf_config=TINY_HF_CONFIG,
    phases=(Phase("64", 64, 4, 0.5), Phase("128", 128, 2, 1.0)),
    eval_rows=2,
    eval_lengths=(128,),
    passkey_lengths=(128,),
    multikey_lengths=(256,),
    min_retrieval=110,
    warmup_steps=2,
)

SUFFIXES = (".py", ".pyi", ".rst", ".md", ".txt")
DOC_SEPARATOR = b"\x00"
HELDOUT_PERCENT = 2
HELDOUT_SAMPLE_BYTES = 4 << 20
MAX_KEYS = 6


# ----------------------------------------------------------------------------------- corpus


@dataclasses.dataclass
class Corpus:
    train: np.ndarray  # uint8 stream of training documents
    heldout_docs: list[tuple[str, bytes]]  # (label/relative path, text), in path order
    files: list[dict]  # every kept file: path, bytes, split
    manifest: dict


def default_roots() -> list[tuple[str, pathlib.Path]]:
    """The standard library, the installed packages and man pages: those that exist here."""
    paths = sysconfig.get_paths()
    roots = [
        ("stdlib", pathlib.Path(paths["stdlib"])),
        ("purelib", pathlib.Path(paths["purelib"])),
        ("man", pathlib.Path("/usr/share/man")),
    ]
    return [(label, root) for label, root in roots if root.is_dir()]


def _wanted(label: str, name: str) -> bool:
    if label == "man":
        return name.endswith(".gz")
    return name.endswith(SUFFIXES)


def _skipped_dir(label: str, name: str, top: bool) -> bool:
    """Caches, hidden folders, package metadata, a site-packages nested in stdlib, and the
    translated man pages (only English sections, man/man*/, are read)."""
    if name == "__pycache__" or name.startswith(".") or name.endswith((".dist-info", ".egg-info")):
        return True
    if label == "man" and top:
        return not name.startswith("man")
    return label == "stdlib" and name in ("site-packages", "dist-packages")


def list_files(roots) -> list[tuple[str, pathlib.Path]]:
    """(label/relative path, absolute path) of candidate files, sorted; purelib inside stdlib
    or linked twice is listed once."""
    found, seen = [], set()
    for label, root in roots:
        for folder, dirs, names in os.walk(root):
            top = pathlib.Path(folder) == root
            dirs[:] = sorted(d for d in dirs if not _skipped_dir(label, d, top))
            for name in sorted(names):
                path = pathlib.Path(folder) / name
                if not _wanted(label, name) or not path.is_file():
                    continue
                real = path.resolve()
                if real in seen:
                    continue
                seen.add(real)
                found.append((f"{label}/{path.relative_to(root).as_posix()}", path))
    found.sort()
    return found


def _read_text(path: pathlib.Path, max_bytes: int) -> bytes | None:
    """The file's bytes cut to max_bytes (at a line end), or None when binary / not UTF-8."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    if len(data) > max_bytes:
        cut = data.rfind(b"\n", 0, max_bytes)
        data = data[: cut + 1 if cut > 0 else max_bytes]
    if not data.strip() or b"\x00" in data:
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode()).digest()
    return int.from_bytes(digest[:4], "little") % 100 < HELDOUT_PERCENT


def load_corpus(
    roots, max_file_bytes: int, max_total_bytes: int, max_seconds: float, threads: int = 16
) -> Corpus:
    """Read, filter, dedupe and split the corpus: files taken in the order of a hash of their
    path (a sample of every root) until max_total_bytes or max_seconds."""
    t0 = time.perf_counter()
    candidates = list_files(roots)
    by_hash = sorted(candidates, key=lambda item: hashlib.sha256(item[0].encode()).digest())
    kept, digests, total = {}, set(), 0
    counts = {"candidates": len(candidates), "unreadable_or_binary": 0, "duplicates": 0}
    with ThreadPoolExecutor(threads) as pool:
        for start in range(0, len(by_hash), 512):
            chunk = by_hash[start : start + 512]
            texts = pool.map(lambda item: _read_text(item[1], max_file_bytes), chunk)
            for (rel, _), data in zip(chunk, texts, strict=True):
                if data is None:
                    counts["unreadable_or_binary"] += 1
                    continue
                digest = hashlib.blake2b(data, digest_size=16).digest()
                if digest in digests:
                    counts["duplicates"] += 1
                    continue
                digests.add(digest)
                kept[rel] = data
                total += len(data)
            if total >= max_total_bytes or time.perf_counter() - t0 > max_seconds:
                counts["stopped_reading"] = "bytes" if total >= max_total_bytes else "seconds"
                break
    if not kept:
        raise SystemExit("error: no readable text files under the corpus roots")
    heldout = sorted(rel for rel in kept if is_heldout(rel))
    if not heldout:  # a small corpus: hold out the file with the smallest hash
        heldout = [min(kept, key=lambda rel: hashlib.sha256(rel.encode()).digest())]
    heldout_set = set(heldout)
    train_paths = sorted(rel for rel in kept if rel not in heldout_set)
    if not train_paths:
        raise SystemExit("error: the corpus has a single file; it is needed as held-out text")
    train = np.frombuffer(
        DOC_SEPARATOR.join(rel.encode() + b"\n" + kept[rel] for rel in train_paths), np.uint8
    )
    files = [
        {
            "path": rel,
            "bytes": len(kept[rel]),
            "split": "heldout" if rel in heldout_set else "train",
        }
        for rel in sorted(kept)
    ]
    return Corpus(
        train=train,
        heldout_docs=[(rel, kept[rel]) for rel in heldout],
        files=files,
        manifest=corpus_manifest(roots, files, counts, max_file_bytes, max_total_bytes),
    )


def corpus_manifest(roots, files, counts, max_file_bytes, max_total_bytes) -> dict:
    """Files and bytes per (root, suffix) pattern and split: enough to rebuild the corpus."""
    patterns: dict[str, dict] = {}
    for f in files:
        label = f["path"].split("/", 1)[0]
        suffix = pathlib.PurePosixPath(f["path"]).suffix
        key = f"{label}/**/*{suffix}"
        row = patterns.setdefault(key, {"train_files": 0, "train_bytes": 0, "heldout_files": 0})
        if f["split"] == "train":
            row["train_files"] += 1
            row["train_bytes"] += f["bytes"]
        else:
            row["heldout_files"] += 1
    return {
        "roots": {label: str(root) for label, root in roots},
        "python": sys.version.split()[0],
        "suffixes": list(SUFFIXES) + ["man: man*/*.gz"],
        "max_file_bytes": max_file_bytes,
        "max_total_bytes": max_total_bytes,
        "heldout_rule": f"sha256(label/relative path)[:4] little-endian % 100 < {HELDOUT_PERCENT}",
        "skipped": counts,
        "train_files": sum(f["split"] == "train" for f in files),
        "train_bytes": sum(f["bytes"] for f in files if f["split"] == "train"),
        "heldout_files": sum(f["split"] == "heldout" for f in files),
        "heldout_bytes": sum(f["bytes"] for f in files if f["split"] == "heldout"),
        "patterns": dict(sorted(patterns.items())),
    }


def heldout_sample(docs: list[tuple[str, bytes]], max_bytes: int) -> list[tuple[str, bytes]]:
    """Held-out files up to max_bytes, taken in hash order (a mix of every root), path-sorted."""
    sample, size = [], 0
    for rel, data in sorted(docs, key=lambda doc: hashlib.sha256(doc[0].encode()).digest()):
        if size >= max_bytes:
            break
        sample.append((rel, data))
        size += len(data)
    return sorted(sample)


def document_stream(docs: list[tuple[str, bytes]], min_len: int) -> np.ndarray:
    """Documents joined like the training stream, repeated when shorter than min_len."""
    stream = np.frombuffer(
        DOC_SEPARATOR.join(rel.encode() + b"\n" + data for rel, data in docs), np.uint8
    )
    return np.resize(stream, max(len(stream), min_len))


# ------------------------------------------------------------------------------------- data


def windows(rng: np.random.Generator, stream: np.ndarray, rows: int, length: int) -> np.ndarray:
    starts = rng.integers(0, len(stream) - length + 1, size=rows)
    return stream[starts[:, None] + np.arange(length)[None, :]]


def retrieval_document(
    rng: np.random.Generator, haystack_text: str, length: int, multikey: bool
) -> tuple[bytes, str]:
    """A passkey or multi-key prompt of exactly `length` - 5 bytes over real text + its answer."""
    prompt_len = length - passkey.KEY_DIGITS
    if multikey:
        room = prompt_len - len(passkey.multikey_question("x" * 12))
        most = max(1, min(MAX_KEYS, room // 40))
        prompt, key = passkey.multikey_prompt(
            rng, prompt_len, int(rng.integers(1, most + 1)), pool=haystack_text
        )
    else:
        prompt, key = passkey.passkey_prompt(rng, prompt_len, rng.random(), pool=haystack_text)
    return (prompt + key).encode("latin-1"), key


def training_batch(
    rng: np.random.Generator,
    stream: np.ndarray,
    rows: int,
    row_len: int,
    retrieval_rate: float,
    min_retrieval: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [rows, row_len] (uint8) and the 0/1 answer mask. Retrieval rows: real text,
    a separator, then a retrieval document of log-uniform length whose haystack is real text
    (bytes read as latin-1 so they pass through unchanged)."""
    ids = windows(rng, stream, rows, row_len)
    mask = np.zeros((rows, row_len), np.float32)
    if row_len < min_retrieval:
        return ids, mask
    for row in np.flatnonzero(rng.random(rows) < retrieval_rate):
        length = int(np.exp(rng.uniform(np.log(min_retrieval), np.log(row_len))).round())
        length = min(max(length, min_retrieval), row_len)
        text = bytes(windows(rng, stream, 1, length)[0]).decode("latin-1")
        doc, _ = retrieval_document(rng, text, length, multikey=rng.random() < 0.5)
        ids[row, row_len - length :] = np.frombuffer(doc, np.uint8)
        if length < row_len:
            ids[row, row_len - length - 1] = DOC_SEPARATOR[0]
        mask[row, row_len - passkey.KEY_DIGITS :] = 1.0
    return ids, mask


def retrieval_eval_batch(rng, stream, rows, length, multikey) -> tuple[np.ndarray, np.ndarray]:
    """Rows of one retrieval document each over held-out text, needle depths spread evenly."""
    ids = np.empty((rows, length), np.uint8)
    for row in range(rows):
        text = bytes(windows(rng, stream, 1, length)[0]).decode("latin-1")
        if multikey:
            doc, _ = retrieval_document(rng, text, length, multikey=True)
        else:
            depth = row / max(1, rows - 1)
            prompt, key = passkey.passkey_prompt(rng, length - passkey.KEY_DIGITS, depth, pool=text)
            doc = (prompt + key).encode("latin-1")
        ids[row] = np.frombuffer(doc, np.uint8)
    mask = np.zeros((rows, length), np.float32)
    mask[:, length - passkey.KEY_DIGITS :] = 1.0
    return ids, mask


# ------------------------------------------------------------------------------------ model


def train_flops_per_step(config: ModelConfig, phase: Phase) -> float:
    """Matmul FLOPs of one training step (forward + backward = 3x forward); attention causal."""
    h, d = config.hidden_size, config.head_dim
    per_layer = h * d * (2 * config.num_heads + 2 * config.num_kv_heads)
    per_layer += 3 * h * config.intermediate_size
    dense = 2 * (config.num_layers * per_layer + h * config.vocab_size)
    tokens = phase.batch * phase.seq_len
    attention = 2 * config.num_heads * d * phase.seq_len * config.num_layers  # causal half
    return 3.0 * tokens * (dense + attention)


def optimizer(weight_decay: float) -> optax.GradientTransformation:
    """AdamW without the learning rate (applied in the step, so the schedule can follow time)."""
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.scale_by_adam(b1=0.9, b2=0.95, eps=1e-8),
        optax.add_decayed_weights(
            weight_decay, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
    )


def learning_rate(peak: float, step: int, progress: float, warmup: int) -> float:
    warm = min(1.0, (step + 1) / warmup)
    return peak * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@functools.lru_cache(maxsize=4)
def compiled_functions(config: ModelConfig, dtype, weight_decay: float, answer_weight: float):
    """(graphdef, optimizer, jitted train step, jitted eval): cached, so runs in one process
    (the tests) compile once."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: CausalLM(config, dtype=dtype)))
    tx = optimizer(weight_decay)

    def nll_and_hits(params, ids):
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), params))
        ids = ids.astype(jnp.int32)
        logits = model(ids[:, :-1])
        targets = ids[:, 1:]
        nll = (
            jax.nn.logsumexp(logits, -1)
            - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        )
        return nll, logits.argmax(-1) == targets

    def loss(params, ids, mask):
        nll, _ = nll_and_hits(params, ids)
        answer = mask[:, 1:]
        lm = nll.mean()
        answer_loss = (nll * answer).sum() / jnp.maximum(answer.sum(), 1.0)
        return lm + answer_weight * answer_loss, (lm, answer_loss)

    def step(params, opt_state, ids, mask, lr):
        (_, (lm, answer_loss)), grads = jax.value_and_grad(loss, has_aux=True)(params, ids, mask)
        norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p - lr * u, params, updates)
        return params, opt_state, jnp.stack([lm, answer_loss, norm])

    def evaluate(params, ids, mask):
        """Per row: summed next-token loss (nats) and whether every answer token is argmax."""
        nll, hit = nll_and_hits(params, ids)
        answer = mask[:, 1:] > 0
        return nll.sum(-1), (hit | ~answer).all(-1)

    return graphdef, tx, jax.jit(step, donate_argnums=(0, 1)), jax.jit(evaluate)


class Trainer:
    """f32 master parameters + optimizer state, trained and evaluated by `compiled_functions`."""

    def __init__(self, config: ModelConfig, seed: int, weight_decay: float, answer_weight: float):
        self.config = config
        self.dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
        _, params = nnx.split(CausalLM(config, dtype=self.dtype, rngs=nnx.Rngs(seed)))
        self.params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
        _, self.tx, self.step_fn, self.eval_fn = compiled_functions(
            config, self.dtype, weight_decay, answer_weight
        )
        self.opt_state = self.tx.init(self.params)

    def train_step(self, ids, mask, lr: float):
        self.params, self.opt_state, stats = self.step_fn(
            self.params, self.opt_state, jnp.asarray(ids), jnp.asarray(mask), jnp.float32(lr)
        )
        return stats

    def evaluate(self, ids, mask):
        nll, correct = self.eval_fn(self.params, jnp.asarray(ids), jnp.asarray(mask))
        return np.asarray(nll), np.asarray(correct)

    def load_weights(self, folder: pathlib.Path) -> None:
        """Parameters from an HF folder (the optimizer state stays fresh)."""
        model, _ = load_model(folder, jnp.float32)
        weights = {f"params/{k}": np.asarray(v) for k, v in checkpoint_params(model).items()}
        self.load_state_tensors({**weights, **self.state_tensors(params=False)})

    def n_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(self.params))

    # checkpoint tensors: "params/<path>" and "opt/<index>" (leaf order of the optimizer state)
    def state_tensors(self, params: bool = True) -> dict[str, np.ndarray]:
        tensors = {}
        if params:
            tensors = {f"params/{k}": np.asarray(v) for k, v in flat_params(self.params).items()}
        for i, leaf in enumerate(jax.tree.leaves(self.opt_state)):
            tensors[f"opt/{i:05d}"] = np.asarray(leaf)
        return tensors

    def load_state_tensors(self, tensors: dict[str, np.ndarray]) -> None:
        flat = nnx.to_flat_state(self.params)
        leaves = []
        for path, leaf in flat:
            value = tensors[f"params/{'.'.join(map(str, path))}"]
            if value.shape != leaf.shape:
                raise SystemExit(f"error: checkpoint shape mismatch at {path}")
            leaves.append((path, leaf.replace(jnp.asarray(value))))
        self.params = nnx.from_flat_state(leaves)
        opt_leaves, treedef = jax.tree.flatten(self.opt_state)
        self.opt_state = jax.tree.unflatten(
            treedef,
            [jnp.asarray(tensors[f"opt/{i:05d}"], leaf.dtype) for i, leaf in enumerate(opt_leaves)],
        )


def flat_params(params) -> dict[str, jax.Array]:
    return {
        ".".join(map(str, path)): leaf.get_raw_value() for path, leaf in nnx.to_flat_state(params)
    }


# ---------------------------------------------------------------------------------- outputs


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def export_sharded(trainer: Trainer, hf_config: dict, out: pathlib.Path) -> None:
    """bf16 HF folder with the weights in two shards of about equal size + their index."""
    params = {k: np.asarray(v) for k, v in flat_params(trainer.params).items()}
    model = model_from_params(trainer.config, params, jnp.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, hf_config, tmp)
        with safe_open(f"{tmp}/model.safetensors", framework="np") as f:
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    total = sum(t.nbytes for t in tensors.values())
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards, weight_map, size = ({}, {}), {}, 0
    for name in sorted(tensors):
        shard = 0 if size < total / 2 else 1
        shards[shard][name] = tensors[name]
        weight_map[name] = names[shard]
        size += tensors[name].nbytes
    for shard, file_name in zip(shards, names, strict=True):
        tmp_path = out / (file_name + ".tmp")
        save_file(shard, str(tmp_path), metadata={"format": "pt"})
        os.replace(tmp_path, out / file_name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(out / "model.safetensors.index.json", json.dumps(index, indent=1).encode())
    write_atomic(out / "config.json", json.dumps(hf_config, indent=1).encode())


def loss_png(log: dict) -> bytes | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = log["steps"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    tokens = [r["tokens"] / 1e6 for r in steps]
    ax.plot(tokens, [r["lm_loss"] / math.log(2) for r in steps], lw=0.8, label="train (bits/byte)")
    evals = log["evals"]
    if evals:
        ax.plot(
            [r["tokens"] / 1e6 for r in evals],
            [r["heldout_bits_per_byte"] for r in evals],
            "o-",
            label=f"held-out ({evals[0]['length']}-token windows)",
        )
    for prev, row in zip(steps, steps[1:], strict=False):
        if row["phase"] != prev["phase"]:
            ax.axvline(row["tokens"] / 1e6, color="grey", ls=":")
            ax.text(row["tokens"] / 1e6, ax.get_ylim()[1], row["phase"], va="top", fontsize=8)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("bits per byte")
    ax.set_ylim(0, min(8.0, ax.get_ylim()[1]))
    handles = ax.get_legend_handles_labels()
    if evals:
        acc = ax.twinx()
        acc.plot(
            [r["tokens"] / 1e6 for r in evals],
            [r["passkey_accuracy"] for r in evals],
            "s--",
            color="tab:green",
            label=f"passkey accuracy ({evals[0]['length']} tokens)",
        )
        acc.set_ylim(-0.02, 1.02)
        acc.set_ylabel("passkey accuracy")
        handles = [a + b for a, b in zip(handles, acc.get_legend_handles_labels(), strict=True)]
    # Below the axes: inside, it covers the accuracy curve's top right.
    ax.legend(*handles, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def log_json(log: dict) -> bytes:
    """Indented, except the per-step and per-eval rows: one line each."""
    rows = {key: log[key] for key in ("steps", "evals")}
    head = json.dumps({k: v for k, v in log.items() if k not in rows}, indent=1)[:-2]
    body = ",\n".join(
        f' "{key}": [\n' + ",\n".join("  " + json.dumps(r) for r in value) + "\n ]"
        for key, value in rows.items()
    )
    return (head + ",\n" + body + "\n}\n").encode()


def write_outputs(trainer, hf_config, out: pathlib.Path, log: dict, extras: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    export_sharded(trainer, hf_config, out)
    if not (out / "tokenizer.json").is_file():
        try:
            save_byte_tokenizer(out / "tokenizer.json")
        except ImportError:  # no `tokenizers` here: the byte tokenizer can be written anywhere
            print("tokenizers not installed: no tokenizer.json written", flush=True)
    write_atomic(out / "training_log.json", log_json(log))
    png = loss_png(log)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in [*extras.items(), ("loss.png", png)]:
            if data is None:
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    write_atomic(out / "extras.tar", buffer.getvalue())


# ------------------------------------------------------------------------------- checkpoint


def save_checkpoint(ckpt: pathlib.Path, trainer: Trainer, meta: dict) -> None:
    """ckpt/state.safetensors + ckpt/state.json, replaced together (a new folder renamed in)."""
    ckpt.mkdir(parents=True, exist_ok=True)
    fresh, current, old = ckpt / "next", ckpt / "current", ckpt / "old"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    save_file(trainer.state_tensors(), str(fresh / "state.safetensors"))
    (fresh / "state.json").write_text(json.dumps(meta))
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        current.rename(old)
    fresh.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(ckpt: pathlib.Path, trainer: Trainer) -> dict | None:
    current = ckpt / "current"
    if not (current / "state.json").is_file():
        current = ckpt / "old"  # interrupted between the two renames
        if not (current / "state.json").is_file():
            return None
    meta = json.loads((current / "state.json").read_text())
    trainer.load_state_tensors(load_file(str(current / "state.safetensors")))
    return meta


# ------------------------------------------------------------------------------------- main


SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupt:
    """First SIGTERM / SIGINT: finish the step, save, exit. A second one: stop at once."""

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"signal {signum}: saving and stopping", flush=True)


def parse_phase(text: str) -> Phase:
    """ "SEQ:BATCH:UNTIL", e.g. "8192:16:0.5"."""
    try:
        seq, batch, until = text.split(":")
        phase = Phase(
            f"{int(seq) // 1024}K" if int(seq) >= 1024 else seq, int(seq), int(batch), float(until)
        )
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"phase {text!r} is not SEQ:BATCH:UNTIL") from err
    if phase.seq_len < 1 or phase.batch < 1 or not 0 < phase.until <= 1:
        raise argparse.ArgumentTypeError(f"phase {text!r}: positive sizes, 0 < UNTIL <= 1")
    return phase


def phase_at(phases, progress: float) -> Phase:
    return next((p for p in phases if progress < p.until), phases[-1])


def heldout_eval(trainer, stream, rows, length, batches, seed) -> float:
    """Bits per byte over `batches` x `rows` fixed held-out windows of `length` tokens."""
    rng = np.random.default_rng(seed)
    total = 0.0
    for _ in range(batches):
        ids = windows(rng, stream, rows, length + 1)
        nll, _ = trainer.evaluate(ids, np.zeros(ids.shape, np.float32))
        total += float(nll.sum())
    return total / (batches * rows * length) / math.log(2)


def final_eval(trainer, setup: Setup, stream, seed) -> dict:
    """Held-out bits/byte at each eval length; passkey and multi-key accuracy (all 5 answer
    digits argmax = greedy decoding) on `eval_rows` held-out-text prompts per length.
    An evaluation that fails (e.g. memory) is reported as its error, the others still run."""
    jobs = {}
    for length in setup.eval_lengths:
        batches = max(1, 4 * setup.phases[0].seq_len // length)
        jobs[f"heldout_bits_per_byte_{length}"] = lambda length=length, batches=batches: round(
            heldout_eval(trainer, stream, setup.eval_rows, length, batches, seed + 7), 4
        )
    for kind, lengths in (("passkey", setup.passkey_lengths), ("multikey", setup.multikey_lengths)):
        for length in lengths:

            def accuracy(kind=kind, length=length):
                rng = np.random.default_rng([seed, length, kind == "multikey"])
                ids, mask = retrieval_eval_batch(
                    rng, stream, setup.eval_rows, length + 1, kind == "multikey"
                )
                return round(float(trainer.evaluate(ids, mask)[1].mean()), 3)

            jobs[f"{kind}_accuracy_{length}"] = accuracy
    result = {}
    for name, job in jobs.items():
        try:
            result[name] = job()
        except Exception as err:  # reported in the log; the other evaluations still run
            result[name] = f"error: {type(err).__name__}: {err}"[:300]
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--ckpt", type=pathlib.Path, required=True)
    parser.add_argument("--minutes", type=float, default=8.6, help="wall budget of this run")
    parser.add_argument("--steps", type=int, help="schedule by steps (deterministic) not time")
    parser.add_argument("--stop-after", type=int, help="stop (as if interrupted) at this step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke configuration")
    parser.add_argument(
        "--phases",
        type=parse_phase,
        nargs="+",
        help="SEQ:BATCH:UNTIL curriculum (UNTIL: fraction of the schedule; last must be 1)",
    )
    parser.add_argument(
        "--init-from",
        type=pathlib.Path,
        help="start from this HF folder's weights (fresh optimizer), e.g. a previous run's --out",
    )
    parser.add_argument("--corpus-root", type=pathlib.Path, action="append")
    parser.add_argument("--max-file-kb", type=int, default=256)
    parser.add_argument("--max-corpus-mb", type=float, default=256.0)
    parser.add_argument("--max-corpus-seconds", type=float, default=60.0)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--retrieval-rate", type=float, default=0.1)
    parser.add_argument("--answer-weight", type=float, default=1.0)
    parser.add_argument("--ckpt-seconds", type=float, default=60.0)
    parser.add_argument(
        "--final-reserve", type=float, default=50.0, help="seconds kept for evaluation + saving"
    )
    parser.add_argument("--log-every", type=int, default=25, help="steps between log fetches")
    return parser


def main(argv=None, start: float | None = None) -> dict:
    """Train (or resume), evaluate, write the outputs; returns the log. `start`: the moment the
    --minutes budget counts from (the process start when run as a script)."""
    start = time.perf_counter() if start is None else start
    parser = build_parser()
    declare(parser, "train_longctx")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be >= 1")
    setup = TINY if args.tiny else FULL
    if args.phases:
        if args.phases[-1].until != 1.0 or any(
            a.until >= b.until for a, b in zip(args.phases, args.phases[1:], strict=False)
        ):
            parser.error("--phases: UNTIL must increase and end at 1")
        setup = dataclasses.replace(setup, phases=tuple(args.phases))
    if args.ckpt.resolve().is_relative_to(args.out.resolve()):
        parser.error("--ckpt must not be inside --out (the checkpoint is not an output)")
    with Interrupt() as interrupt:
        command = sys.argv if argv is None else ["train_longctx", *argv]
        return train(args, setup, start, interrupt, command)


def train(args, setup: Setup, start: float, interrupt: Interrupt, command: list[str]) -> dict:
    deadline = start + 60.0 * args.minutes - args.final_reserve

    roots = (
        [(root.name or str(root), root) for root in args.corpus_root]
        if args.corpus_root
        else default_roots()
    )
    for _, root in roots:
        if not root.is_dir():
            print(f"error: corpus root {root} is not a folder", file=sys.stderr)
            raise SystemExit(2)
    t0 = time.perf_counter()
    corpus = load_corpus(
        roots, args.max_file_kb << 10, int(args.max_corpus_mb * (1 << 20)), args.max_corpus_seconds
    )
    longest = max(p.seq_len for p in setup.phases) + 1
    train_stream = np.resize(corpus.train, max(len(corpus.train), 2 * longest))
    sample = heldout_sample(corpus.heldout_docs, HELDOUT_SAMPLE_BYTES)
    eval_longest = max((*setup.eval_lengths, *setup.passkey_lengths, *setup.multikey_lengths))
    heldout_stream = document_stream(sample, 2 * (eval_longest + 1))
    corpus_seconds = time.perf_counter() - t0
    print(
        f"corpus: {corpus.manifest['train_files']} train files "
        f"({corpus.manifest['train_bytes'] / 1e6:.1f} MB), {corpus.manifest['heldout_files']} "
        f"held out, {corpus_seconds:.1f} s",
        flush=True,
    )
    extras = {
        "heldout_text.jsonl.gz": gzip.compress(
            b"".join(
                json.dumps({"path": rel, "text": data.decode("utf-8")}).encode() + b"\n"
                for rel, data in sample
            ),
            mtime=0,
        ),
        "corpus_files.json.gz": gzip.compress(json.dumps(corpus.files).encode(), mtime=0),
    }

    hf_config = dict(setup.hf_config)
    if args.init_from:
        hf_config = read_hf_config(args.init_from)
    config = ModelConfig.from_hf_dict(hf_config)
    trainer = Trainer(config, args.seed, args.weight_decay, args.answer_weight)
    if args.init_from:
        trainer.load_weights(args.init_from)
    rng = np.random.default_rng(args.seed)
    meta = load_checkpoint(args.ckpt, trainer)
    if meta is not None:
        if meta["hf_config"] != hf_config:
            print(f"error: {args.ckpt} holds a different model", file=sys.stderr)
            raise SystemExit(2)
        rng.bit_generator.state = meta["rng_state"]
        log = meta["log"]
        step, train_seconds = meta["step"], meta["train_seconds"]
        schedule_seconds = meta["schedule_seconds"]
        print(f"resumed from {args.ckpt} at step {step}", flush=True)
    else:
        step, train_seconds = 0, 0.0
        schedule_seconds = max(1.0, deadline - time.perf_counter())
        log = {
            "command": command,
            "hf_config": hf_config,
            "n_params": trainer.n_params(),
            "device": jax.devices()[0].device_kind,
            "compute_dtype": jnp.dtype(trainer.dtype).name,
            "phases": [dataclasses.asdict(p) for p in setup.phases],
            "predicted_train_flops_per_step": {
                p.name: train_flops_per_step(config, p) for p in setup.phases
            },
            "args": json.loads(json.dumps(vars(args), default=str)),
            "corpus": corpus.manifest,
            "corpus_seconds": round(corpus_seconds, 1),
            "steps": [],
            "evals": [],
            "runs": [],
        }
    log["runs"].append(
        {
            "start_step": step,
            "corpus_seconds": round(corpus_seconds, 1),
            "corpus_train_bytes": corpus.manifest["train_bytes"],
        }
    )
    print(f"{trainer.n_params() / 1e6:.2f}M parameters, compute {log['compute_dtype']}", flush=True)
    for name, flops in log["predicted_train_flops_per_step"].items():
        print(f"phase {name}: {flops / 1e12:.2f} TFLOP per step (matmuls, fwd + bwd)", flush=True)

    def progress() -> float:
        if args.steps is not None:
            return step / args.steps
        return train_seconds / schedule_seconds

    def checkpoint(with_eval: bool) -> None:
        if with_eval:
            length = setup.eval_lengths[0]
            bpb = heldout_eval(trainer, heldout_stream, setup.eval_rows, length, 2, args.seed + 5)
            ids, mask = retrieval_eval_batch(
                np.random.default_rng(args.seed + 6),
                heldout_stream,
                setup.eval_rows,
                length + 1,
                multikey=False,
            )
            tokens = log["steps"][-1]["tokens"] if log["steps"] else 0
            log["evals"].append(
                {
                    "step": step,
                    "tokens": tokens,
                    "length": length,
                    "heldout_bits_per_byte": round(bpb, 4),
                    "passkey_accuracy": round(float(trainer.evaluate(ids, mask)[1].mean()), 3),
                }
            )
            print(json.dumps(log["evals"][-1]), flush=True)
        save_checkpoint(
            args.ckpt,
            trainer,
            {
                "hf_config": hf_config,
                "step": step,
                "rng_state": rng.bit_generator.state,
                "train_seconds": train_seconds,
                "schedule_seconds": schedule_seconds,
                "log": log,
            },
        )
        write_outputs(trainer, hf_config, args.out, log, extras)

    pending, last_ckpt = [], time.perf_counter()
    tokens = log["steps"][-1]["tokens"] if log["steps"] else 0
    phase_start = {}  # phase name -> (perf_counter, step) of its first step in this run

    def flush_pending() -> None:
        for row, stats in pending:
            lm, answer_loss, norm = np.asarray(stats).tolist()
            row.update(lm_loss=round(lm, 4), answer_loss=round(answer_loss, 4))
            row["grad_norm"] = round(norm, 3)
            log["steps"].append(row)
        if pending:
            row = log["steps"][-1]
            print(json.dumps(row), flush=True)
        pending.clear()

    stopped = "schedule"
    try:
        while progress() < 1.0 and (args.steps is None or step < args.steps):
            now = time.perf_counter()
            if interrupt.requested:
                stopped = "signal"
                break
            if args.stop_after is not None and step >= args.stop_after:
                stopped = "stop-after"
                break
            if args.steps is None and now >= deadline:
                stopped = "time"
                break
            phase = phase_at(setup.phases, progress())
            lr = learning_rate(args.lr, step, progress(), setup.warmup_steps)
            ids, mask = training_batch(
                rng,
                train_stream,
                phase.batch,
                phase.seq_len + 1,
                args.retrieval_rate,
                setup.min_retrieval,
            )
            stats = trainer.train_step(ids, mask, lr)
            step += 1
            tokens += phase.batch * phase.seq_len
            phase_start.setdefault(phase.name, (now, step - 1))
            if len(pending) + 1 >= args.log_every:
                jax.block_until_ready(stats)
            train_seconds += time.perf_counter() - now
            pending.append(
                (
                    {
                        "step": step,
                        "phase": phase.name,
                        "tokens": tokens,
                        "lr": round(lr, 7),
                        "answer_rows": int((mask.sum(-1) > 0).sum()),
                        "elapsed": round(time.perf_counter() - start, 2),
                    },
                    stats,
                )
            )
            if len(pending) >= args.log_every:
                flush_pending()
            if time.perf_counter() - last_ckpt >= args.ckpt_seconds:
                flush_pending()
                t = time.perf_counter()
                checkpoint(with_eval=True)
                train_seconds += time.perf_counter() - t
                last_ckpt = time.perf_counter()
        flush_pending()
    except Exception as err:  # a failing phase (memory, a kernel) must still leave its log
        stopped = f"error: {type(err).__name__}: {err}"[:1000]
        print(stopped, file=sys.stderr, flush=True)
        try:
            flush_pending()
        except Exception:  # the failed steps' statistics: dropped
            pending.clear()
    end = time.perf_counter()
    log["runs"][-1].update(end_step=step, stopped=stopped)
    log["throughput"] = throughput(log, phase_start, end, config, setup, 2 * args.log_every)
    log["stopped"] = stopped
    if any(leaf.is_deleted() for leaf in jax.tree.leaves(trainer.params)):
        write_atomic(args.out / "training_log.json", log_json(log))
        print("parameters lost in the failed step: the last checkpoint's outputs are kept")
        raise SystemExit(1)
    checkpoint(with_eval=True)
    if stopped in ("signal", "stop-after"):
        print(f"stopped ({stopped}) at step {step}; checkpoint in {args.ckpt}", flush=True)
        return log
    t = time.perf_counter()
    log["final_eval"] = final_eval(trainer, setup, heldout_stream, args.seed)
    log["final_eval"]["seconds"] = round(time.perf_counter() - t, 1)
    log["total_seconds"] = round(time.perf_counter() - start, 1)
    write_outputs(trainer, hf_config, args.out, log, extras)
    print_summary(log, args.out)
    return log


def throughput(log, phase_start, end, config, setup, skip_steps: int) -> dict:
    """Per phase of this run: steps, seconds and tokens/s with the compile included, and tokens/s
    and TFLOP/s after the phase's first `skip_steps` steps (checkpoint pauses included)."""
    rows = {}
    names = list(phase_start)
    for i, name in enumerate(names):
        t_start, s_start = phase_start[name]
        t_end, s_end = (
            phase_start[names[i + 1]] if i + 1 < len(names) else (end, log["steps"][-1]["step"])
        )
        phase = next(p for p in setup.phases if p.name == name)
        steps, seconds = max(0, s_end - s_start), max(t_end - t_start, 1e-9)
        rows[name] = {
            "steps": steps,
            "seconds_incl_compile": round(seconds, 1),
            "tokens_per_s_incl_compile": round(steps * phase.batch * phase.seq_len / seconds),
        }
        logged = [r for r in log["steps"] if s_start + skip_steps < r["step"] <= s_end]
        if len(logged) >= 2 and logged[-1]["elapsed"] > logged[0]["elapsed"]:
            rate = (logged[-1]["step"] - logged[0]["step"]) / (
                logged[-1]["elapsed"] - logged[0]["elapsed"]
            )
            rows[name]["tokens_per_s"] = round(rate * phase.batch * phase.seq_len)
            rows[name]["tflops"] = round(rate * train_flops_per_step(config, phase) / 1e12, 1)
    return rows


def print_summary(log: dict, out: pathlib.Path) -> None:
    last = log["steps"][-1] if log["steps"] else {}
    print("\nphase   steps  seconds  tokens/s(with compile)  tokens/s  TFLOP/s (after compile)")
    for name, row in log["throughput"].items():
        print(
            f"{name:6s} {row['steps']:6d} {row['seconds_incl_compile']:8.1f} "
            f"{row['tokens_per_s_incl_compile']:22d} {row.get('tokens_per_s', 0):9d} "
            f"{row.get('tflops', 0.0):8.1f}"
        )
    print(
        f"steps {last.get('step', 0)}, tokens {last.get('tokens', 0) / 1e6:.1f}M, "
        f"final train loss {last.get('lm_loss', float('nan')) / math.log(2):.3f} bits/byte"
    )
    for key, value in log.get("final_eval", {}).items():
        print(f"{key:32s} {value}")
    files = sorted(p for p in out.iterdir() if p.is_file())
    print(f"{out}: " + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.2f} MiB" for p in files))
    print(f"total {log.get('total_seconds', 0)} s", flush=True)


if __name__ == "__main__":
    main(start=PROCESS_START)
