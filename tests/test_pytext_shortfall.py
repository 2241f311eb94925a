import jax.numpy as jnp
import numpy as np

from benchmarks.pytext_shortfall import needle_mass, suspects, with_dense_heads
from minference_jax import patterns as P
from tests.oracles import random_qkv


def test_needle_mass_matches_a_float64_softmax():
    q, k, _ = random_qkv(4, 1, 50, 4, 2, 8, jnp.float32)
    keep = np.random.default_rng(0).random((4, 50)) < 0.5
    share, kept = needle_mass(q, k, jnp.asarray(keep), (20, 27))
    qn, kn = np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0]
    for h in range(4):
        logits = kn[:, h // 2] @ qn[-1, h] / np.sqrt(8)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        want_share = p[20:27].sum()
        np.testing.assert_allclose(share[h], want_share, rtol=1e-5)
        np.testing.assert_allclose(kept[h], (p * keep[h])[20:27].sum() / want_share, rtol=1e-5)


def test_suspects_are_the_largest_losses_and_dense_heads_replace_them():
    loss = np.array([[0.1, 0.5, 0.0], [0.7, 0.2, 0.5]])
    recall = np.array([[0.9, 0.8, 0.3], [0.9, 0.9, 0.7]])
    assert suspects(loss, recall, 3) == [(1, 0), (1, 2), (0, 1)]  # equal losses: lower recall
    tiny = np.full((2, 3), 1e-4)  # needle losses too small to matter: by recall
    assert suspects(tiny, recall, 2) == [(0, 2), (1, 2)]
    table = with_dense_heads(P.AShape(64, 1024), [(1, 0), (0, 1)], 2, 3)
    assert table.layers == (
        (P.AShape(64, 1024), P.Dense(), P.AShape(64, 1024)),
        (P.Dense(), P.AShape(64, 1024), P.AShape(64, 1024)),
    )
