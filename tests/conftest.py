"""Shared test setup: a pipeline config far smaller than the `tiny` preset, and a JIT cache.

Most pipeline tests compile the same train step (about 20 s on a 2-core CPU
each time `train.train` builds a fresh `nnx.jit`); a persistent compilation
cache turns every repeat into a ~2 s load. It lives in a temporary directory
made by the first pytest process (the xdist controller, which the workers it
spawns inherit it from via the environment) and removed by that process at
the end; subprocesses started by tests find it through JAX_COMPILATION_CACHE_DIR.
Two workers racing on one entry are harmless: an unreadable entry is a cache
miss (JAX warns and compiles).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import common
from ttt_jax.models import dit

_OWNER = pytest.StashKey[str]()

_CACHE_ENV = "TTT_JAX_TEST_JIT_CACHE"


def pytest_configure(config):
  if _CACHE_ENV not in os.environ:  # the first pytest process owns the cache
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="ttt_jax_test_jit_cache_")
    config.stash[_OWNER] = os.environ[_CACHE_ENV]
  cache = os.environ[_CACHE_ENV]
  # Before anything compiles: JAX decides once whether the persistent cache is used.
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_unconfigure(config):
  if (owned := config.stash.get(_OWNER, None)) is not None:
    shutil.rmtree(owned, ignore_errors=True)
    os.environ.pop(_CACHE_ENV, None)


def small_config(seconds: int = 3, **train) -> ml_collections.ConfigDict:
  """The tiny preset of `seconds`, shrunk: 32x48 video, 4 videos, 4 text tokens, batch 2.

  One learning-rate recipe (3e-3, warm-up 5) for every group, so that tests
  which train share one compiled step. Stays locked like a real stage
  config; `train` overrides keys of config.train.
  """
  cfg = common.get_config(seconds, "tiny")
  cfg.data.height, cfg.data.width = 32, 48  # multiples of 16 (codec 8x * patch 2)
  cfg.data.num_videos = 4
  cfg.data.text_len = 4
  cfg.model.ttt.mini_batch_size = 8
  cfg.optim.lr.update(dict(other=3e-3, attn_qkvo=3e-3, ttt=3e-3))  # keeps lr locked
  cfg.optim.warmup_steps = 5
  cfg.train.batch_size = 2
  cfg.train.steps = 4
  cfg.train.log_every = 2
  cfg.train.ckpt_every = 2
  cfg.sample.steps = 2
  for key, value in train.items():
    cfg.train[key] = value
  return cfg


def build_model(cfg: ml_collections.ConfigDict, seed: int = 0) -> dit.VideoDiT:
  return dit.build(cfg.model, text_dim=cfg.data.text_dim, rngs=nnx.Rngs(seed))


def perturb(model: nnx.Module, scale: float, seed: int = 1) -> nnx.Module:
  """Adds scale * N(0, 1) to every parameter, in place (zero-initialised heads and gates
  too, so that every parameter gets a gradient and the output depends on every input)."""
  params = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(tree, [
      x + scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))
  return model


def params_of(model: nnx.Module) -> dict:
  """The model's parameters as a nested dict of numpy arrays (a snapshot)."""
  return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def flat(tree) -> dict:
  """{'blocks/attn/to_q/kernel': leaf, ...} of a nested dict or nnx.State (no '.value')."""
  name = lambda k: str(getattr(k, "key", getattr(k, "name", k)))
  return {"/".join(name(k) for k in path if not isinstance(k, jax.tree_util.GetAttrKey)): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture
def cfg() -> ml_collections.ConfigDict:
  return small_config()
