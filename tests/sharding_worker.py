"""Run by tests/test_sharding.py in fresh processes (device count / distributed set up first).

    python tests/sharding_worker.py local N            # one process, N forced CPU devices
    python tests/sharding_worker.py host PID PORT      # one of 2 processes (gloo collectives)
Prints one JSON line with the max relative logits error of sharded vs single-device prefill.
"""

import json
import os
import sys

mode = sys.argv[1]
if mode == "local":
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[2]}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if mode == "host":
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{sys.argv[3]}", num_processes=2, process_id=int(sys.argv[2])
    )

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from minference_jax import AShape, BlockSparse, Dense, HeadPatterns, VerticalSlash  # noqa: E402
from minference_jax.models import AttentionSpec, CausalLM, ModelConfig  # noqa: E402
from minference_jax.models.generation import prefill  # noqa: E402
from minference_jax.models.sharding import make_mesh  # noqa: E402

config = ModelConfig.from_hf_dict(
    dict(
        model_type="qwen2",
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
)
model = CausalLM(config, rngs=nnx.Rngs(3))
ids = jax.random.randint(jax.random.PRNGKey(0), (2, 300), 0, 64)
layer = (VerticalSlash(30, 50), AShape(4, 64), BlockSparse(2), Dense()) * 2
specs = {"dense": AttentionSpec(), "minference": AttentionSpec(HeadPatterns((layer, layer[::-1])))}
report = {"devices": len(jax.devices())}
for name, spec in specs.items():
    single = prefill(model, ids, spec).last_logits
    sharded = prefill(model, ids, spec, mesh=make_mesh()).last_logits
    err = float(jnp.linalg.norm(sharded - single) / jnp.linalg.norm(single))
    report[name] = err
    assert np.isfinite(err)
if mode == "local":
    try:
        prefill(model, ids, mesh=make_mesh(8) if len(jax.devices()) >= 8 else None)
    except ValueError as err:
        report["error"] = str(err)
print(json.dumps(report), flush=True)
