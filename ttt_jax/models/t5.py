"""The T5 v1.1 encoder (CogVideoX's text model) in Flax NNX, loaded from transformers weights.

    ids [N, L] -> embed -> for each layer:
                   x += SelfAttention(RMSNorm(x)) + relative position bias (shared, layer 0's)
                   x += FFN(RMSNorm(x)),  FFN(h) = (gelu_tanh(h W0) * (h W1)) Wo   (gated-GELU)
                 -> final RMSNorm -> [N, L, d_model]

T5 has no biases, does not scale attention scores by 1/sqrt(d), and its RMS
norm has no mean subtraction. The position bias depends on key - query
through log-spaced buckets, bidirectional for the encoder. Layers are
stacked and scanned like the DiT's. `load_t5_encoder(dir)` streams a
transformers `T5EncoderModel` folder (config.json + safetensors, sharded or
bf16) through `ttt_jax.weights`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ttt_jax.weights import Entry, SafetensorsCheckpoint, same, stream, transposed

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int
  d_model: int
  d_kv: int
  d_ff: int
  num_layers: int
  num_heads: int
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  layer_norm_epsilon: float = 1e-6

  @classmethod
  def from_json(cls, file: pathlib.Path) -> T5Config:
    raw = json.loads(file.read_text())
    if raw.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
      raise ValueError(f"{file}: feed_forward_proj={raw['feed_forward_proj']!r}; only T5 v1.1's "
                       f"'gated-gelu' is supported")
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in raw.items() if k in fields})


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """[L, L] bucket of key j for query i (bidirectional: half the buckets for j > i).

  |j - i| below half a direction's buckets gets a bucket of its own; larger
  distances share log-spaced buckets up to max_distance, beyond which all
  fall in the last one.
  """
  rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # key - query
  half = num_buckets // 2
  base = np.where(rel > 0, half, 0)
  dist = np.abs(rel)
  exact = half // 2
  # In float32, as the reference computes it: bucket edges fall on exact log ratios
  # (e.g. distance 32 of 128 with 16 buckets), where float64 would round the other way.
  ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(exact))
  scaled = ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
  log = exact + scaled.astype(np.int64)
  return base + np.where(dist < exact, dist, np.minimum(log, half - 1))


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), -1, keepdims=True) + eps)) * weight


class T5Block(nnx.Module):
  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    inner = cfg.num_heads * cfg.d_kv
    linear = lambda i, o: nnx.Linear(i, o, use_bias=False, rngs=rngs)
    self.q, self.k, self.v = linear(cfg.d_model, inner), linear(cfg.d_model, inner), \
        linear(cfg.d_model, inner)
    self.o = linear(inner, cfg.d_model)
    self.wi_0, self.wi_1 = linear(cfg.d_model, cfg.d_ff), linear(cfg.d_model, cfg.d_ff)
    self.wo = linear(cfg.d_ff, cfg.d_model)
    self.attn_norm = nnx.Param(jnp.ones((cfg.d_model,)))
    self.ff_norm = nnx.Param(jnp.ones((cfg.d_model,)))
    self.cfg = cfg

  def __call__(self, x: Array, bias: Array) -> Array:
    """x [N, L, D], bias [H, L, L] -> [N, L, D]."""
    N, L, _ = x.shape
    H, dk, eps = self.cfg.num_heads, self.cfg.d_kv, self.cfg.layer_norm_epsilon
    h = rms_norm(x, self.attn_norm[...], eps)
    heads = lambda proj: proj(h).reshape(N, L, H, dk)
    scores = jnp.einsum("nqhd,nkhd->nhqk", heads(self.q), heads(self.k)) + bias  # no 1/sqrt(d)
    attn = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    x = x + self.o(jnp.einsum("nhqk,nkhd->nqhd", attn, heads(self.v)).reshape(N, L, H * dk))
    h = rms_norm(x, self.ff_norm[...], eps)
    return x + self.wo(jax.nn.gelu(self.wi_0(h), approximate=True) * self.wi_1(h))


class T5Encoder(nnx.Module):
  """ids [N, L] -> hidden states [N, L, d_model]; every position attends to every other."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs)
    self.relative_bias = nnx.Param(jnp.zeros((cfg.relative_attention_num_buckets, cfg.num_heads)))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs: nnx.Rngs) -> T5Block:
      return T5Block(cfg, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = nnx.Param(jnp.ones((cfg.d_model,)))

  def __call__(self, ids: Array) -> Array:
    L = ids.shape[1]
    buckets = relative_position_buckets(L, self.cfg.relative_attention_num_buckets,
                                        self.cfg.relative_attention_max_distance)
    bias = jnp.transpose(self.relative_bias[...][buckets], (2, 0, 1))  # [H, L, L]

    def body(x, block):
      return block(x, bias)

    x = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(self.embed(ids), self.blocks)
    return rms_norm(x, self.final_norm[...], self.cfg.layer_norm_epsilon)


def t5_entries(cfg: T5Config) -> list[Entry]:
  """transformers T5EncoderModel keys -> T5Encoder parameters."""
  D, inner, F = cfg.d_model, cfg.num_heads * cfg.d_kv, cfg.d_ff
  blk = "encoder.block.{i}.layer"
  lin = lambda ours, theirs, n_in, n_out: Entry(("blocks", ours, "kernel"), f"{blk}.{theirs}.weight",
                                                (n_out, n_in), transposed)
  return [
      Entry(("embed", "embedding"), "shared.weight", (cfg.vocab_size, D), same),
      Entry(("relative_bias",), "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            (cfg.relative_attention_num_buckets, cfg.num_heads), same),
      lin("q", "0.SelfAttention.q", D, inner), lin("k", "0.SelfAttention.k", D, inner),
      lin("v", "0.SelfAttention.v", D, inner), lin("o", "0.SelfAttention.o", inner, D),
      Entry(("blocks", "attn_norm"), f"{blk}.0.layer_norm.weight", (D,), same),
      lin("wi_0", "1.DenseReluDense.wi_0", D, F), lin("wi_1", "1.DenseReluDense.wi_1", D, F),
      lin("wo", "1.DenseReluDense.wo", F, D),
      Entry(("blocks", "ff_norm"), f"{blk}.1.layer_norm.weight", (D,), same),
      Entry(("final_norm",), "encoder.final_layer_norm.weight", (D,), same),
  ]


def load_t5_encoder(directory: str | pathlib.Path, dtype: Any = jnp.float32) -> T5Encoder:
  """A T5Encoder with the weights of a transformers T5EncoderModel folder (streamed)."""
  directory = pathlib.Path(directory)
  if not (directory / "config.json").is_file():
    raise FileNotFoundError(f"{directory}: no config.json of a T5 encoder")
  cfg = T5Config.from_json(directory / "config.json")
  model = nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0)))
  ckpt = SafetensorsCheckpoint(directory)
  entries = t5_entries(cfg)
  # The tied input embedding may be stored twice; only `shared` is read.
  ckpt.check(entries, cfg.num_layers, what="T5 encoder", ignore=("encoder.embed_tokens.weight",))
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for path, value in stream(ckpt, entries, cfg.num_layers, desc="loading T5"):
    params[path].set_value(jnp.asarray(value, dtype))  # the abstract model gets real arrays
  return model
