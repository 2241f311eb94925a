"""Train the tiny long-context passkey checkpoint shipped in `minference_jax/checkpoints/`.

The shipped checkpoint came from two runs on a 2-core CPU (about 14 + 12 minutes):

    python -m benchmarks.train_tiny_longctx --out /tmp/phase1
    python -m benchmarks.train_tiny_longctx --out /tmp/phase2 --init-from /tmp/phase1 \
        --lengths 2048 4096 8192 --lr 1e-3 --steps 160 --warm-steps 0 --max-seconds 660

A 2-layer Llama (hidden 128, 4 query / 1 kv heads, head_dim 32, MLP 384, byte vocabulary, RoPE
theta 1e6, 0.44M parameters) learns next-byte prediction on passkey documents
(`minference_jax.passkey`: haystack + needle + question + 5-digit answer), 8192 tokens per step.
Curriculum: 150 steps on 128-token documents (the needle is near, retrieval is learnt within
~150 steps), then lengths drawn from --lengths. Loss = --lm-weight x mean next-token loss + mean
loss on the answer digits (retrieval, not haystack modelling, is what must be learnt; a 4-layer
model trained on 2K-32K documents from the start never learnt it, see benchmarks/NOTES.md).
f32 master weights and a hand-written AdamW (no optax dependency); bf16 compute with cuDNN
attention on GPU, f32 on CPU. Stops after --steps or --max-seconds, whichever first, and writes
an HF folder: config.json, model.safetensors, tokenizer.json (byte ids), training_log.json.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.device_guard import declare
from convert.checkpoint import export_hf
from minference_jax import passkey
from minference_jax.models import CausalLM, ModelConfig
from minference_jax.models.checkpoint import load_hf
from minference_jax.tokenization import save_byte_tokenizer

HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "attention_bias": False,
    "torch_dtype": "bfloat16",
}
TOKENS_PER_STEP = 8192


def length_schedule(step: int, rng: np.random.Generator, warm_steps: int, lengths) -> int:
    """The shortest documents first (retrieval is learnt fastest there), then a uniform mix."""
    if step < warm_steps:
        return min(lengths)
    return int(rng.choice(lengths))


def adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.01, clip=1.0):
    def init(params):
        zeros = jax.tree.map(jnp.zeros_like, params)
        return {"m": zeros, "v": zeros, "t": jnp.zeros((), jnp.int32)}

    def update(grads, state, params):
        norm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, clip / (norm + 1e-6)), grads)
        t = state["t"] + 1
        m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
        v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
        rate = lr(t) * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        params = jax.tree.map(
            lambda p, m, v: (
                p - rate * m / (jnp.sqrt(v) + eps) - lr(t) * weight_decay * p * (p.ndim > 1)
            ),
            params,
            m,
            v,
        )
        return params, {"m": m, "v": v, "t": t}, norm

    return init, update


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, required=True)
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--max-seconds", type=float, default=840.0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--warm-steps", type=int, default=150, help="steps on the shortest documents"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    parser.add_argument("--tokens-per-step", type=int, default=TOKENS_PER_STEP)
    parser.add_argument("--layers", type=int, default=HF_CONFIG["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=HF_CONFIG["hidden_size"])
    parser.add_argument("--heads", type=int, default=HF_CONFIG["num_attention_heads"])
    parser.add_argument("--rope-theta", type=float, default=HF_CONFIG["rope_theta"])
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--lm-weight", type=float, default=0.25, help="haystack loss weight")
    parser.add_argument("--init-from", type=pathlib.Path, help="continue from an HF folder")
    declare(parser, "train_tiny_longctx")
    args = parser.parse_args(argv)

    hf_config = dict(
        HF_CONFIG,
        num_hidden_layers=args.layers,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_attention_heads=args.heads,
        num_key_value_heads=max(1, args.heads // 4),
        head_dim=args.hidden // args.heads,
        rope_theta=args.rope_theta,
        max_position_embeddings=max(max(args.lengths), HF_CONFIG["max_position_embeddings"]),
    )
    config = ModelConfig.from_hf_dict(hf_config)
    # bf16 with cuDNN attention on GPU; f32 on CPU (XLA's attention has no fast bf16 path there)
    dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
    if args.init_from:
        model, _ = load_hf(args.init_from, dtype)
    else:
        model = CausalLM(config, dtype=dtype, rngs=nnx.Rngs(args.seed))
    graphdef, state = nnx.split(model)
    master = jax.tree.map(lambda x: x.astype(jnp.float32), state)
    n_params = sum(x.size for x in jax.tree.leaves(master))
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)

    def lr(t):
        warm = jnp.minimum(1.0, t / 100)
        progress = jnp.minimum(1.0, t / args.steps)
        return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + jnp.cos(jnp.pi * progress)))

    opt_init, opt_update = adamw(lr)

    def loss_fn(master, ids, answer):
        model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(dtype), master))
        logits = model(ids[:, :-1])
        targets = ids[:, 1:]
        nll = (
            jax.nn.logsumexp(logits, -1)
            - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
        )
        mask = answer[:, 1:]
        answer_nll = (nll * mask).sum() / mask.sum()
        correct = ((logits.argmax(-1) == targets) | (mask == 0)).all(axis=-1).mean()
        return args.lm_weight * nll.mean() + answer_nll, (nll.mean(), answer_nll, correct)

    @jax.jit
    def train_step(master, opt_state, ids, answer):
        grads, aux = jax.grad(loss_fn, has_aux=True)(master, ids, answer)
        master, opt_state, norm = opt_update(grads, opt_state, master)
        return master, opt_state, aux, norm

    rng = np.random.default_rng(args.seed)
    pool_rng = np.random.default_rng(args.seed + 1000)  # evaluation draws fresh haystack text
    pool = passkey.haystack(pool_rng, max(1 << 21, 64 * max(args.lengths)))
    opt_state = opt_init(master)
    log, start, step = [], time.perf_counter(), 0
    while step < args.steps and time.perf_counter() - start < args.max_seconds:
        length = length_schedule(step, rng, args.warm_steps, args.lengths)
        # length + 1 tokens: the model sees exactly `length` (a power of two) inputs
        batch = max(1, args.tokens_per_step // length)
        ids, answer = passkey.training_batch(rng, batch, length + 1, pool)
        master, opt_state, (lm, ans, acc), norm = train_step(
            master, opt_state, jnp.asarray(ids), jnp.asarray(answer)
        )
        step += 1
        if step % args.log_every == 0 or step == 1:
            row = dict(
                step=step,
                seconds=round(time.perf_counter() - start, 1),
                length=length,
                lm_loss=round(float(lm), 4),
                answer_loss=round(float(ans), 4),
                passkey_acc=round(float(acc), 3),
                grad_norm=round(float(norm), 3),
            )
            log.append(row)
            print(json.dumps(row), flush=True)

    model = nnx.merge(graphdef, jax.tree.map(lambda x: x.astype(jnp.bfloat16), master))
    export_hf(model, dict(hf_config, torch_dtype="bfloat16"), args.out)
    save_byte_tokenizer(args.out / "tokenizer.json")
    (args.out / "training_log.json").write_text(json.dumps(log, indent=1))
    print(f"wrote {args.out} after {step} steps, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
