"""An independent, deliberately naive TTT reference for tests.

Primal form only: a Python loop over mini-batches and over the tokens inside
each, per-token gradients from `jax.grad` of the inner loss (no hand-derived
LayerNorm/GELU backward, no dual form, no scan), and every token read out with
the explicitly updated weights. Mini-batches may be ragged.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp


def layer_norm(z, weight, bias, eps=1e-8):
  mu = jnp.mean(z)
  var = jnp.mean((z - mu) ** 2)
  return weight * (z - mu) / jnp.sqrt(var + eps) + bias


def g_linear(u, p):
  return u @ p["W"] + p["b"][0]


def g_mlp(u, p):
  return jax.nn.gelu(u @ p["W1"] + p["b1"][0], approximate=True) @ p["W2"] + p["b2"][0]


def naive_ttt_head(
    g: Callable, q, k, v, eta, ln_w, ln_b, params: dict,
    sizes: Sequence[int],
):
  """One head. q, k, v: [T, d]; eta: [T]; sizes: mini-batch sizes summing to T.

  Returns (z [T, d], final params).
  """
  assert sum(sizes) == q.shape[0]

  def inner_loss(p, kj, vj):
    return 0.5 * jnp.sum((layer_norm(g(kj, p), ln_w, ln_b) - (vj - kj)) ** 2)

  outs, start = [], 0
  for size in sizes:
    step = jax.tree.map(jnp.zeros_like, params)
    for j in range(start, start + size):
      grad_j = jax.grad(inner_loss)(params, k[j], v[j])
      step = jax.tree.map(lambda s, gj: s + eta[j] * gj, step, grad_j)
    params = jax.tree.map(lambda p, s: p - s, params, step)
    for j in range(start, start + size):
      outs.append(q[j] + layer_norm(g(q[j], params), ln_w, ln_b))
    start += size
  return jnp.stack(outs), params


def naive_ttt(g: Callable, q, k, v, eta, ln_w, ln_b, params: dict):
  """All heads and batch rows: q, k, v [B, H, NC, K, d], eta [B, H, NC, K].

  `params` leaves carry a leading head axis. Returns (z [B, H, NC, K, d],
  final params with leading [B, H]).
  """
  B, H, NC, K, d = q.shape
  flat = lambda x: x.reshape(B, H, NC * K, *x.shape[4:])
  run = lambda q_, k_, v_, e_, w_, b_, p_: naive_ttt_head(
      g, q_, k_, v_, e_, w_, b_, p_, [K] * NC)
  per_head = jax.vmap(run, in_axes=(0, 0, 0, 0, 0, 0, 0))  # over H
  per_batch = jax.vmap(per_head, in_axes=(0, 0, 0, 0, None, None, None))  # over B
  z, final = per_batch(flat(q), flat(k), flat(v), flat(eta), ln_w, ln_b, params)
  return z.reshape(q.shape), final
