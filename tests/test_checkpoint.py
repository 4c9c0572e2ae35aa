"""Orbax checkpoints: exact round trip, params-only loading, atomicity, retention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.conftest import build_model, flat, params_of, small_config
from ttt_jax import checkpoint, optim
from ttt_jax.data import pipeline
from ttt_jax.models.vae import make_codec


def _trained(cfg, seed=0, updates=2):
  """A model and optimizer with non-trivial state: `updates` AdamW steps on random grads."""
  model = build_model(cfg, seed)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(cfg.optim), wrt=nnx.Param)
  update = nnx.jit(lambda opt, m, g: opt.update(m, g))
  for i in range(updates):
    grads = jax.tree.map(lambda x: jnp.sin(x * (i + 2.0) + 1.0), nnx.state(model, nnx.Param))
    update(optimizer, model, grads)
  return model, optimizer


def _state(optimizer):
  return flat(jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(optimizer))))


def _assert_trees_equal(got, want):
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _data_state():
  """A grain iterator state part-way through an epoch (what train() checkpoints)."""
  examples = [{"latents": np.full((1,), i, np.float32), "text": np.zeros((1,), np.float32)}
              for i in range(8)]
  it = pipeline.batches(examples, 2, seed=3)
  for _ in range(3):
    next(it)
  return it.get_state(), examples


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """workdir with one checkpoint (step 7) of a model/optimizer that took 2 updates."""
  cfg = small_config()
  model, optimizer = _trained(cfg)
  workdir = tmp_path_factory.mktemp("run")
  rng = jax.random.fold_in(jax.random.key(42), 5)
  data_state, examples = _data_state()
  ckpt = checkpoint.Checkpointer(workdir, keep=2)
  ckpt.save(7, model, optimizer, rng, data_state)
  ckpt.close()
  return dict(cfg=cfg, workdir=workdir, model=model, optimizer=optimizer, rng=rng,
              data_state=data_state, examples=examples)


def test_restore_is_exact(saved):
  cfg = saved["cfg"]
  model, optimizer = _trained(cfg, seed=1, updates=0)  # fresh: other init, zero moments
  want_params, want_opt = flat(params_of(saved["model"])), _state(saved["optimizer"])
  assert any(np.any(flat(params_of(model))[k] != v) for k, v in want_params.items())

  ckpt = checkpoint.Checkpointer(saved["workdir"])
  assert ckpt.latest_step() == 7
  step, rng, data_state = ckpt.restore(model, optimizer)
  ckpt.close()

  assert step == 7
  _assert_trees_equal(flat(params_of(model)), want_params)
  _assert_trees_equal(_state(optimizer), want_opt)
  assert int(optimizer.step[...]) == 2
  np.testing.assert_array_equal(jax.random.key_data(rng), jax.random.key_data(saved["rng"]))
  assert data_state == saved["data_state"]
  # The restored data state resumes the iterator where the saved one would have gone.
  it_a = pipeline.batches(saved["examples"], 2, seed=3)
  it_a.set_state(saved["data_state"])
  it_b = pipeline.batches(saved["examples"], 2, seed=3)
  it_b.set_state(data_state)
  for _ in range(4):
    np.testing.assert_array_equal(next(it_a)["latents"], next(it_b)["latents"])

  # Identical outputs (same compiled function, bit-identical inputs).
  layout = pipeline.video_layout(cfg.data, cfg.seconds, make_codec(cfg.data.codec), 2)
  k1, k2 = jax.random.split(jax.random.key(0))
  latents = jax.random.normal(k1, (1, layout.num_frames, 4, 6, 16))
  text = jax.random.normal(k2, (1, layout.num_text, cfg.data.text_dim))
  t = jnp.array([500])
  forward = nnx.jit(lambda m, x, c, t: m(x, c, t, layout))
  out_saved, out_restored = forward(saved["model"], latents, text, t), forward(model, latents, text, t)
  assert float(jnp.abs(out_saved).max()) > 0  # the trained output head is not the zero init
  np.testing.assert_array_equal(out_restored, out_saved)


def test_load_params_loads_params_only(saved):
  cfg = saved["cfg"]
  frozen_cfg = cfg.copy_and_resolve_references()
  frozen_cfg.optim.lr.update(dict(other=0.0, attn_qkvo=1e-3, ttt=1e-3))  # other opt state
  model = build_model(cfg, seed=1)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(frozen_cfg.optim), wrt=nnx.Param)
  opt_before = _state(optimizer)

  assert checkpoint.load_params(saved["workdir"], model) == 7
  _assert_trees_equal(flat(params_of(model)), flat(params_of(saved["model"])))
  _assert_trees_equal(_state(optimizer), opt_before)  # untouched: still the fresh optimizer


@pytest.mark.parametrize("layout", ["missing", "empty", "empty_checkpoints"])
def test_load_params_without_checkpoint_raises(tmp_path, layout):
  workdir = tmp_path / "run"
  if layout != "missing":
    workdir.mkdir()
  if layout == "empty_checkpoints":
    (workdir / "checkpoints").mkdir()
  model = build_model(small_config())
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load_params(workdir, model)


def test_load_params_does_not_create_directories(tmp_path):
  """A typo'd --config.init_from must not leave empty run directories behind.

  Fails until checkpoint.load_params opens its CheckpointManager with create=False.
  """
  workdir = tmp_path / "typo"
  with pytest.raises(FileNotFoundError):
    checkpoint.load_params(workdir, build_model(small_config()))
  assert not workdir.exists()


def test_load_params_into_a_different_model_names_the_checkpoint(saved):
  cfg = saved["cfg"].copy_and_resolve_references()
  cfg.model.sequence_layer = "local"
  with pytest.raises(ValueError, match="does not fit this model"):
    checkpoint.load_params(saved["workdir"], build_model(cfg))


@pytest.fixture(scope="module")
def saved_local(tmp_path_factory):
  """A workdir holding a local-attention model (no global slot), step 5."""
  cfg = small_config().copy_and_resolve_references()
  cfg.model.sequence_layer = "local"
  model, optimizer = _trained(cfg)
  workdir = tmp_path_factory.mktemp("local")
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(5, model, optimizer, jax.random.key(0), _data_state()[0])
  ckpt.close()
  return dict(cfg=cfg, workdir=workdir, model=model)


def test_load_params_keeps_fresh_layers_a_base_lacks(saved_local):
  """A local-attention base into a TTT model: every base param copied, TTT params untouched."""
  model = build_model(small_config(), seed=3)
  init = flat(params_of(model))
  assert checkpoint.load_params(saved_local["workdir"], model, fresh=optim.is_global_slot) == 5
  got, base = flat(params_of(model)), flat(params_of(saved_local["model"]))
  fresh_names = sorted(set(got) - set(base))
  assert fresh_names and all("ttt" in n.split("/") for n in fresh_names), fresh_names
  for name in got:
    want = base[name] if name in base else init[name]
    np.testing.assert_array_equal(got[name], want, err_msg=name)
  assert any(not np.array_equal(init[n], base[n]) for n in base)  # the copy did something


def test_load_params_fresh_must_cover_every_missing_param(saved_local):
  model = build_model(small_config(), seed=3)
  with pytest.raises(ValueError, match="does not fit this model"):
    checkpoint.load_params(saved_local["workdir"], model)  # no fresh: strict
  only_gates = lambda path: optim.is_global_slot(path) and "alpha" in str(path[-1])
  with pytest.raises(ValueError, match=r"lacks parameters .*blocks/ttt/"):
    checkpoint.load_params(saved_local["workdir"], model, fresh=only_gates)


def test_load_params_names_params_the_model_lacks(saved):
  cfg = saved["cfg"].copy_and_resolve_references()
  cfg.model.sequence_layer = "local"
  with pytest.raises(ValueError, match=r"holds parameters this model does not have: .*blocks/ttt/"):
    checkpoint.load_params(saved["workdir"], build_model(cfg), fresh=optim.is_global_slot)


@pytest.mark.parametrize("tmp_name", ["9.orbax-checkpoint-tmp", "9.orbax-checkpoint-tmp-1712345678"])
def test_half_written_checkpoint_is_not_latest(saved, tmp_path, tmp_name):
  cfg, workdir = saved["cfg"], tmp_path / "run"
  ckpt = checkpoint.Checkpointer(workdir)
  ckpt.save(3, saved["model"], saved["optimizer"], saved["rng"], saved["data_state"])
  ckpt.close()
  crashed = workdir / "checkpoints" / tmp_name  # a crash mid-save of step 9
  (crashed / "params").mkdir(parents=True)
  (crashed / "params" / "junk").write_bytes(b"\x00not a checkpoint")

  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.latest_step() == 3
  model, optimizer = _trained(cfg, seed=1, updates=0)
  assert ckpt.restore(model, optimizer)[0] == 3
  ckpt.close()
  assert checkpoint.load_params(workdir, build_model(cfg, seed=1)) == 3


def test_keep_checkpoints(saved, tmp_path):
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  assert ckpt.latest_step() is None
  for step in (2, 4, 6, 8):
    ckpt.save(step, saved["model"], saved["optimizer"], saved["rng"], saved["data_state"])
  ckpt.close()
  kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == [6, 8]
  assert checkpoint.Checkpointer(tmp_path).latest_step() == 8
