"""AdamW with per-group learning rates and frozen groups (the stage recipe).

Parameters fall into three groups by name: 'ttt' (TTT layers and their
gates), 'attn_qkvo' (attention q/k/v/out projections) and 'other'. Each
group has its own learning rate (linear warm-up, then constant); a rate of 0
freezes the group: its gradient is zeroed before clipping, so frozen weights
neither move nor count towards the global gradient norm.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax

GROUPS = ("other", "attn_qkvo", "ttt")
_ATTN_PROJ = ("to_q", "to_k", "to_v", "to_out")


def param_group(path: Sequence[Any]) -> str:
  names = jax.tree_util.keystr(tuple(path), simple=True, separator="/").split("/")
  if "ttt" in names:
    return "ttt"
  if "attn" in names and any(n in names for n in _ATTN_PROJ):
    return "attn_qkvo"
  return "other"


def is_global_slot(path: Sequence[Any]) -> bool:
  """Whether a parameter belongs to a block's global slot (TTT or a baseline) or its gates."""
  return param_group(path) == "ttt"


def param_labels(params: Any) -> Any:
  return jax.tree_util.tree_map_with_path(lambda path, _: param_group(path), params)


def learning_rate(optim_cfg: Mapping[str, Any], group: str) -> optax.Schedule:
  peak = optim_cfg["lr"][group]
  warmup = optim_cfg["warmup_steps"]
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)], [warmup])


def trainable_grad_norm(optim_cfg: Mapping[str, Any], grads: Any) -> jax.Array:
  """Global norm of the gradients the clip sees: frozen groups (lr 0) left out."""
  lrs = optim_cfg["lr"]
  kept = jax.tree.map(lambda g, group: g if lrs[group] else jnp.zeros_like(g), grads,
                      param_labels(grads))
  return optax.tree.norm(kept)


def make_optimizer(optim_cfg: Mapping[str, Any]) -> optax.GradientTransformation:
  lrs = dict(optim_cfg["lr"])
  if set(lrs) != set(GROUPS):
    raise ValueError(f"optim.lr must give exactly the groups {GROUPS}, got {sorted(lrs)}")
  frozen = {g: optax.set_to_zero() if lr == 0 else optax.identity() for g, lr in lrs.items()}
  adamw = {
      g: optax.set_to_zero() if lr == 0 else optax.adamw(
          learning_rate(optim_cfg, g), b1=optim_cfg["b1"], b2=optim_cfg["b2"],
          weight_decay=optim_cfg["weight_decay"])
      for g, lr in lrs.items()}
  return optax.chain(
      optax.multi_transform(frozen, param_labels),
      optax.clip_by_global_norm(optim_cfg["grad_clip"]),
      optax.multi_transform(adamw, param_labels),
  )
