"""train.train end to end: learning, workdir contents, exact resume, stage init, text dropout."""

import functools
import json

import imageio.v3 as iio
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tests.conftest import build_model, flat, params_of, perturb, small_config
from ttt_jax import checkpoint, metrics, optim, train
from ttt_jax.data import pipeline
from ttt_jax.diffusion import NoiseSchedule, TimestepDistribution
from ttt_jax.models.vae import make_codec


def _final_params(cfg, workdir):
  model = build_model(cfg, seed=123)  # other init than the run's: loading must overwrite it
  step = checkpoint.load_params(workdir, model)
  return step, flat(params_of(model))


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  """A first-stage run: 120 steps at lr 3e-3 (warm-up 5), a log line every 10 steps."""
  cfg = small_config(steps=120, log_every=10, ckpt_every=50)
  workdir = tmp_path_factory.mktemp("stage1")
  result = train.train(cfg, workdir)
  return cfg, workdir, result


def test_loss_decreases_and_workdir_is_complete(stage1):
  cfg, workdir, result = stage1
  rows = metrics.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in rows] == list(range(10, 121, 10))
  losses = [r["loss"] for r in rows]
  assert result == {"first_loss": losses[0], "last_loss": losses[-1]}
  assert all(np.isfinite(losses)) and all(r["grad_norm"] > 0 for r in rows)
  assert rows[0]["lr_ttt"] == pytest.approx(3e-3) and rows[0]["lr_other"] == pytest.approx(3e-3)
  # Per-block slot diagnostics (2 blocks): a live gradient, gates moving off their 0.1 init.
  for r in rows:
    assert len(r["slot_grad_norm"]) == 2 and min(r["slot_grad_norm"]) > 0
    assert all(0 < g < 1 for g in r["gate_fwd_video"] + r["gate_bwd_video"])
  assert rows[0]["gate_fwd_video"] != rows[-1]["gate_fwd_video"]
  # The zero-initialised model starts at loss ~1 (v of unit-scale latents). Each logged value
  # is a mean over 10 steps x 2 examples of random timesteps; at a plateau the windows
  # scatter by about +-5%, so a 15% drop of the first-two vs last-two means is learning,
  # not timestep noise (the run is deterministic on CPU: it drops ~27%).
  first, last = np.mean(losses[:2]), np.mean(losses[-2:])
  assert last < 0.85 * first, losses

  loaded = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  dump = lambda c: json.dumps(c.to_dict(), sort_keys=True)  # also tells 0 from 0.0
  assert dump(loaded) == dump(cfg)
  loaded.lock()  # ConfigDict equality also compares the lock
  assert loaded == cfg

  png = (workdir / "loss.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n"
  image = iio.imread(workdir / "loss.png")
  assert image.shape[:2] == (540, 960) and image.std() > 0  # 8x4.5 in at 120 dpi, not blank

  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [100, 120]  # ckpt_every=50 plus the last step, keep_checkpoints=2
  step, params = _final_params(cfg, workdir)
  assert step == 120 and not np.array_equal(params["proj_out/kernel"], 0)


def test_exact_resume(tmp_path):
  cfg = small_config(steps=8, log_every=2, ckpt_every=4)
  train.train(cfg, tmp_path / "a")  # A: 8 steps straight

  cfg.train.steps = 4  # B: 4 steps, stop; then a new call to 8 resumes from checkpoint 4
  train.train(cfg, tmp_path / "b")
  assert checkpoint.Checkpointer(tmp_path / "b").latest_step() == 4
  cfg.train.steps = 8
  train.train(cfg, tmp_path / "b")

  step_a, params_a = _final_params(cfg, tmp_path / "a")
  step_b, params_b = _final_params(cfg, tmp_path / "b")
  assert step_a == step_b == 8
  for name, value in params_a.items():
    np.testing.assert_array_equal(params_b[name], value, err_msg=name)

  rows_a = metrics.read_metrics(tmp_path / "a" / "metrics.jsonl")
  rows_b = metrics.read_metrics(tmp_path / "b" / "metrics.jsonl")
  assert [r["step"] for r in rows_b] == [2, 4, 6, 8]  # no duplicates after the resume
  for a, b in zip(rows_a, rows_b, strict=True):  # the same batches, noise and updates
    assert (b["step"], b["loss"], b["grad_norm"]) == (a["step"], a["loss"], a["grad_norm"])


def test_next_stage_starts_from_previous_params(stage1, tmp_path):
  cfg1, workdir1, _ = stage1
  cfg = small_config(steps=4, log_every=2, ckpt_every=4)
  cfg.optim.lr.update(dict(other=0.0, attn_qkvo=1e-3, ttt=1e-3))  # paper's later-stage recipe
  cfg.init_from = str(workdir1)
  train.train(cfg, tmp_path)

  _, before = _final_params(cfg1, workdir1)
  _, after = _final_params(cfg, tmp_path)
  init = flat(params_of(build_model(cfg)))  # what a fresh stage would start from
  labels = flat(optim.param_labels(params_of(build_model(cfg))))
  groups = {g: [n for n, lab in labels.items() if lab == g] for g in optim.GROUPS}
  for name in groups["other"]:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  # ...and stage 1 had moved them, so equality means "initialised from stage 1".
  assert sum(not np.array_equal(before[n], init[n]) for n in groups["other"]) \
      >= len(groups["other"]) - 2, "stage 1 barely trained"
  for name in groups["ttt"] + groups["attn_qkvo"]:
    assert not np.array_equal(after[name], before[name]), f"{name} did not train"
  rows = metrics.read_metrics(tmp_path / "metrics.jsonl")
  assert [r["lr_other"] for r in rows] == [0.0, 0.0]


@pytest.fixture(scope="module")
def loss_setup():
  cfg = small_config()
  # Random weights everywhere: the zero-initialised output head would make v_pred == 0
  # whatever the text.
  model = perturb(build_model(cfg), 0.3)
  layout = pipeline.video_layout(cfg.data, 3, make_codec("toy"), 2)
  rng = np.random.default_rng(0)
  latents = rng.normal(size=(2, 13, 4, 6, 16)).astype(np.float32)
  texts = [rng.normal(size=(2, 4, cfg.data.text_dim)).astype(np.float32) for _ in range(2)]
  texts.append(np.zeros_like(texts[0]))
  return model, layout, latents, texts


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_text_dropout_is_applied_in_the_loss(loss_setup, p):
  model, layout, latents, texts = loss_setup
  loss = nnx.jit(functools.partial(train.loss_fn, layout=layout,
                                   schedule=NoiseSchedule.create(num_steps=1000),
                                   timesteps=TimestepDistribution(), text_dropout=p))
  rng = jax.random.key(3)
  zeros = np.zeros_like(texts[0][0])  # the toy encoder's null caption
  a, b, null = (float(loss(model, {"latents": latents, "text": t}, rng, zeros)) for t in texts)
  if p == 1.0:  # every caption replaced by the null (zero) caption: text cannot matter
    assert a == b == null
  else:
    # Beyond float32 rounding of a mean over ~10^4 elements (~1e-7 relative): two captions
    # differ by ~1e-4 here, a caption and the null caption by ~1e-2.
    assert abs(a - b) > 1e-5 * abs(a) and abs(a - null) > 1e-3 * abs(a), (a, b, null)


def test_the_train_state_is_donated(loss_setup):
  """Each step updates params and AdamW moments in place: the previous buffers are freed."""
  cfg = small_config()
  model = build_model(cfg)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(cfg.optim), wrt=nnx.Param)
  _, layout, latents, texts = loss_setup
  step = train.make_step_fn(cfg, layout, model, optimizer)
  old = jax.tree.leaves(nnx.state((model, optimizer)))
  out = step({"latents": latents, "text": texts[0]}, jax.random.key(0), np.zeros_like(texts[0][0]))
  assert np.isfinite(float(out["loss"]))
  assert all(x.is_deleted() for x in old if isinstance(x, jax.Array) and x.size > 1)
  assert not any(x.is_deleted() for x in jax.tree.leaves(nnx.state((model, optimizer))))


def test_microbatches_accumulate_the_mean_gradient(cfg):
  """train.microbatches=2: the loss and gradient are the means over the two parts (every
  second row, keys folded with the part's index), as two separate whole-part gradients give."""
  model = perturb(build_model(cfg), 0.05)
  layout = pipeline.video_layout(cfg.data, 3, make_codec("toy"), 2)
  rng = np.random.default_rng(0)
  batch = {"latents": jnp.asarray(rng.normal(size=(4, 13, 4, 6, 16)), jnp.float32),
           "text": jnp.asarray(rng.normal(size=(4, 4, cfg.data.text_dim)), jnp.float32)}
  null = jnp.zeros(batch["text"].shape[1:])
  loss = functools.partial(train.loss_fn, layout=layout,
                           schedule=NoiseSchedule.create(num_steps=1000),
                           timesteps=TimestepDistribution(), text_dropout=0.5)
  key = jax.random.key(7)
  got_loss, got = nnx.jit(train.accumulated_grads, static_argnums=(4, 5))(
      model, batch, key, null, 2, loss)
  part = nnx.jit(lambda model, b, k: nnx.value_and_grad(loss)(model, b, k, null))
  parts = [part(model, jax.tree.map(lambda x: x[m::2], batch), jax.random.fold_in(key, m))
           for m in range(2)]
  np.testing.assert_allclose(got_loss, (parts[0][0] + parts[1][0]) / 2, rtol=1e-6)
  want = jax.tree.map(lambda a, b: (a + b) / 2, parts[0][1], parts[1][1])
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    # fp32 sums in another order; relative to the leaf's scale.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(np.abs(w).max()), err_msg=str(path))
  with pytest.raises(ValueError, match="train.microbatches=3 does not divide the batch of 4"):
    train.accumulated_grads(model, batch, key, null, 3, loss)


@pytest.mark.parametrize("layer", ["ttt", "full_attention", "local"])
def test_slot_diagnostics_match_a_per_block_computation(layer):
  """Per block: the norm of every global-slot gradient entry of that block (sliced by hand
  from the flat parameter names), and the mean |tanh| of its video gates; none without a
  slot."""
  cfg = small_config()
  with cfg.unlocked():
    cfg.model.sequence_layer = layer
  model = perturb(build_model(cfg), 0.05)
  layout = pipeline.video_layout(cfg.data, 3, make_codec("toy"), 2)
  rng = np.random.default_rng(0)
  batch = {"latents": rng.normal(size=(2, 13, 4, 6, 16)).astype(np.float32),
           "text": rng.normal(size=(2, 4, cfg.data.text_dim)).astype(np.float32)}
  loss = functools.partial(train.loss_fn, layout=layout,
                           schedule=NoiseSchedule.create(num_steps=1000),
                           timesteps=TimestepDistribution(), text_dropout=0.0)
  grads = nnx.grad(loss)(model, batch, jax.random.key(0), np.zeros((4, cfg.data.text_dim)))
  out = train.slot_diagnostics(model, grads)
  if layer == "local":
    assert out == {}
    return
  g, p = flat(grads), flat(params_of(model))
  slot = [k for k in g if k.startswith("blocks/ttt/")]
  assert slot and all(g[k].shape[0] == 2 for k in slot)
  for i in range(2):
    norm = np.sqrt(sum(float(np.sum(np.square(np.asarray(g[k][i], np.float64)))) for k in slot))
    # float32 sums of squares of ~10^4 entries: relative round-off ~1e-6.
    assert float(out["slot_grad_norm"][i]) == pytest.approx(norm, rel=1e-5)
    for d in ("fwd", "bwd"):
      gate = np.mean(np.abs(np.tanh(p[f"blocks/ttt/alpha_{d}_video"][i])))
      assert float(out[f"gate_{d}_video"][i]) == pytest.approx(gate, rel=1e-6)
  assert float(out["slot_grad_norm"][0]) > 0
