"""Stage optimizer: parameter groups, frozen groups, clipping, warm-up, config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.conftest import build_model, flat, params_of, small_config
from ttt_jax import optim


def _optim_cfg(**lr):
  return dict(lr={"other": 1e-3, "attn_qkvo": 1e-3, "ttt": 1e-3, **lr}, warmup_steps=0,
              b1=0.9, b2=0.95, weight_decay=1e-4, grad_clip=1.0)


def _labels(model):
  return flat(optim.param_labels(nnx.state(model, nnx.Param)))


def _random_grads(model, seed=0):
  """A gradient State for every Param of `model`: dense, non-zero, mixed signs."""
  grads = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(grads)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape, x.dtype)
                                      for k, x in zip(keys, leaves)])


def test_param_groups_of_a_real_dit():
  labels = _labels(build_model(small_config()))
  ttt = "blocks/ttt/"
  for gate in ("alpha_fwd_text", "alpha_fwd_video", "alpha_bwd_text", "alpha_bwd_video"):
    assert labels[f"{ttt}{gate}"] == "ttt"
  for name in ("W1", "b1", "W2", "b2", "lr_weight", "ln_weight", "q_proj/kernel",
               "o_proj/bias", "post_norm/scale"):
    assert labels[f"{ttt}ttt/{name}"] == "ttt"
  for proj in ("to_q", "to_k", "to_v", "to_out"):
    for leaf in ("kernel", "bias"):
      assert labels[f"blocks/attn/{proj}/{leaf}"] == "attn_qkvo"
  for name in ("blocks/attn/norm_q/scale", "blocks/attn/norm_k/bias", "blocks/ff_in/kernel",
               "blocks/ff_out/bias", "blocks/norm1/linear/kernel", "patch_embed/kernel",
               "text_proj/kernel", "time_in/kernel", "proj_out/kernel", "out_mod/bias"):
    assert labels[f"{name}"] == "other"
  # Every TTT parameter and nothing else is 'ttt'; exactly 8 attention projection leaves.
  assert {k for k, g in labels.items() if g == "ttt"} == {k for k in labels if k.startswith(ttt)}
  assert sum(g == "attn_qkvo" for g in labels.values()) == 8


def test_zero_lr_freezes_group_bit_exactly():
  cfg = small_config()
  model = build_model(cfg)
  opt_cfg = _optim_cfg(other=0.0)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(opt_cfg), wrt=nnx.Param)
  before, labels = flat(params_of(model)), _labels(model)
  update = nnx.jit(lambda opt, m, g: opt.update(m, g))
  for step in range(3):  # weight decay alone would move 'other' if it were not frozen
    update(optimizer, model, _random_grads(model, seed=step))
  after = flat(params_of(model))
  for name, group in labels.items():
    if group == "other":
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
    else:
      assert np.all(after[name] != before[name]), f"{name} ({group}) did not move"


def test_frozen_gradients_do_not_count_in_the_clip_norm():
  params = {"blocks": {"ttt": {"W1": jnp.ones((4, 3))},
                       "attn": {"to_q": {"kernel": jnp.ones((3, 3))}},
                       "ff_in": {"kernel": jnp.ones((5,))}}}
  assert flat(optim.param_labels(params)) == {
      "blocks/ttt/W1": "ttt", "blocks/attn/to_q/kernel": "attn_qkvo",
      "blocks/ff_in/kernel": "other"}
  rng = np.random.default_rng(0)
  trainable = {"W1": rng.normal(size=(4, 3)) * 3, "to_q": rng.normal(size=(3, 3)) * 3}
  grads = lambda frozen: {"blocks": {
      "ttt": {"W1": jnp.asarray(trainable["W1"], jnp.float32)},
      "attn": {"to_q": {"kernel": jnp.asarray(trainable["to_q"], jnp.float32)}},
      "ff_in": {"kernel": jnp.full((5,), frozen, jnp.float32)}}}
  lr = 1e-3
  tx = optim.make_optimizer(_optim_cfg(other=0.0, attn_qkvo=lr, ttt=lr) | {"weight_decay": 0.0})
  state = tx.init(params)
  ref, _ = tx.update(grads(0.0), state, params)
  got, _ = tx.update(grads(1e12), state, params)
  for name, value in flat(ref).items():
    np.testing.assert_array_equal(flat(got)[name], value, err_msg=name)
  np.testing.assert_array_equal(got["blocks"]["ff_in"]["kernel"], 0.0)
  # Sensitivity: had the 1e12 counted, clipping would scale the trainable grads to ~1e-12,
  # far below Adam's eps=1e-8, and the first update would be ~0 instead of ~lr * sign(g).
  # rtol: first Adam step is g / (|g| + 1e-8) with |g| > 1e-3 after clipping.
  np.testing.assert_allclose(np.abs(flat(got)["blocks/ttt/W1"]), lr, rtol=1e-4)
  # The logged norm is the one the clip saw: without the frozen 1e12s.
  want = np.sqrt(np.sum(trainable["W1"] ** 2) + np.sum(trainable["to_q"] ** 2))
  cfg = _optim_cfg(other=0.0, attn_qkvo=lr, ttt=lr)
  np.testing.assert_allclose(optim.trainable_grad_norm(cfg, grads(1e12)), want, rtol=1e-6)
  np.testing.assert_allclose(optim.trainable_grad_norm(_optim_cfg(), grads(2.0)),
                             np.sqrt(want ** 2 + 5 * 4.0), rtol=1e-6)


@pytest.mark.parametrize("warmup, fraction_at", [
    (10, {0: 0.0, 5: 0.5, 9: 0.9, 10: 1.0, 11: 1.0, 1000: 1.0}),
    (1, {0: 0.0, 1: 1.0, 2: 1.0}),
    (0, {0: 1.0, 1: 1.0, 1000: 1.0}),  # no warm-up: the peak from the first step
])
def test_learning_rate_warmup(warmup, fraction_at):
  peak = 2e-3
  lr = optim.learning_rate(_optim_cfg(ttt=peak) | {"warmup_steps": warmup}, "ttt")
  for step, fraction in fraction_at.items():
    # float32 schedule arithmetic: a few ulps of peak.
    np.testing.assert_allclose(float(lr(step)), fraction * peak, rtol=1e-6, atol=1e-12,
                               err_msg=f"step {step}")
  assert float(optim.learning_rate(_optim_cfg(other=0.0), "other")(5)) == 0.0


@pytest.mark.parametrize("lr, named", [
    ({"other": 1.0, "ttt": 1.0}, ["attn_qkvo", "other", "ttt"]),
    ({"other": 1.0, "attn_qkvo": 1.0, "ttt": 1.0, "mlp": 1.0}, ["mlp"]),
    ({"other": 1.0, "attn": 1.0, "ttt": 1.0}, ["attn", "attn_qkvo"]),
])
def test_bad_lr_groups_raise(lr, named):
  with pytest.raises(ValueError, match="optim.lr must give exactly the groups") as err:
    optim.make_optimizer(_optim_cfg() | {"lr": lr})
  for group in named:
    assert repr(group) in str(err.value)


def test_optimizer_matches_plain_adamw_when_nothing_is_frozen():
  """With all groups trainable and no clipping at play, the chain is AdamW per group."""
  params = {"blocks": {"ttt": {"W1": jnp.linspace(-1, 1, 6)}}, "head": jnp.linspace(0, 1, 4)}
  g = jax.tree.map(lambda x: 0.01 * jnp.cos(7 * x), params)  # global norm << grad_clip
  cfg = _optim_cfg(other=1e-3, ttt=5e-3)
  ours, _ = optim.make_optimizer(cfg).update(g, optim.make_optimizer(cfg).init(params), params)
  for path, peak in (("blocks", 5e-3), ("head", 1e-3)):
    adamw = optax.adamw(peak, b1=0.9, b2=0.95, weight_decay=1e-4)
    want, _ = adamw.update(g[path], adamw.init(params[path]), params[path])
    # Same float32 ops in the same order: agreement to float32 rounding.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), ours[path], want)
