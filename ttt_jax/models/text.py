"""Caption encoders: the frozen text model whose outputs condition the DiT.

CogVideoX conditions on T5-XXL encoder states (4096-d per token, a fixed
number of tokens per caption). Every encoder here returns, for N captions,

    emb  float32 [N, max_len, dim]   per-token embeddings
    mask bool    [N, max_len]        True at real tokens

with each caption truncated or padded to max_len, since the model gives every
segment a fixed text length. The toy encoder gives zeros at padding; T5
gives what CogVideoX's pipeline feeds its transformer: the encoder runs over
the padded sequence with no attention mask, so pads carry the values the
model computes for them. The DiT's trainable text projection maps `dim` to
its width, so encoders can be swapped by name through `make_text_encoder`.
"""

from __future__ import annotations

import abc
import pathlib
import re
import zlib
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import sentencepiece
from flax import nnx

from ttt_jax.models.t5 import load_t5_encoder

Array = jax.Array

_WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script)


class TextEncoder(abc.ABC):
  """Frozen caption encoder. Attributes: dim, the width of a token embedding."""

  dim: int

  @abc.abstractmethod
  def encode(self, captions: Sequence[str], max_len: int) -> tuple[Array, Array]:
    """N captions -> (emb float32 [N, max_len, dim], mask bool [N, max_len])."""


class ToyTextEncoder(TextEncoder):
  """Frozen, deterministic stand-in for T5-XXL used by the embedded toy pipeline.

  Words (lower-cased runs of letters) are hashed with CRC-32 into a fixed
  vocabulary, so ids agree across processes and machines (Python's hash() is
  salted per process). A token's embedding is

      x_i = E[id_i] + P_i + mean_j (E[id_j] + P_j),   out_i = x_i / rms(x_i)

  with E a seeded Gaussian table (unit-variance entries), P a sinusoidal
  position code and the mean taken over the caption's kept tokens: like T5,
  a word's vector depends on its context, and like T5's final RMSNorm every
  token comes out at unit RMS. Nothing is trained.
  """

  def __init__(self, dim: int = 128, vocab_size: int = 16384, seed: int = 0):
    if dim < 2 or dim % 2:
      raise ValueError(f"dim must be a positive even number (sin/cos pairs), got {dim}")
    if vocab_size < 1:
      raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    self.dim = dim
    self.vocab_size = vocab_size
    # PCG64 streams are platform-independent, so the table is the same everywhere.
    self._table = np.random.default_rng(seed).standard_normal((vocab_size, dim), np.float32)

  def tokenize(self, caption: str) -> list[int]:
    """Word ids: CRC-32 of each lower-cased letter run, modulo vocab_size."""
    return [zlib.crc32(w.encode("utf-8")) % self.vocab_size
            for w in _WORD.findall(caption.lower())]

  def positions(self, length: int) -> np.ndarray:
    """Sinusoidal code of positions 0..length-1, (sin, cos) pairs. [length, dim]"""
    inv_freq = 10000.0 ** (-np.arange(0, self.dim, 2) / self.dim)  # [dim/2]
    angle = np.arange(length)[:, None] * inv_freq  # [length, dim/2]
    return np.stack([np.sin(angle), np.cos(angle)], axis=-1).reshape(length, self.dim)

  def encode(self, captions: Sequence[str], max_len: int) -> tuple[Array, Array]:
    """N captions -> (emb float32 [N, max_len, dim], mask bool [N, max_len])."""
    if isinstance(captions, str):
      raise TypeError("captions must be a sequence of strings, got a single str")
    if max_len < 0:
      raise ValueError(f"max_len must be >= 0, got {max_len}")
    pos = self.positions(max_len)  # [max_len, dim], float64
    emb = np.zeros((len(captions), max_len, self.dim), np.float32)
    mask = np.zeros((len(captions), max_len), bool)
    for n, caption in enumerate(captions):
      ids = self.tokenize(caption)[:max_len]
      if not ids:
        continue
      x = self._table[ids].astype(np.float64) + pos[:len(ids)]  # [L, dim]
      x = x + x.mean(axis=0)
      emb[n, :len(ids)] = x / np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True))
      mask[n, :len(ids)] = True
    return jnp.asarray(emb), jnp.asarray(mask)


class T5TextEncoder(TextEncoder):
  """T5 v1.1 encoder + its sentencepiece tokenizer, as the CogVideoX pipeline uses them.

  `path`: a diffusers pipeline root holding `text_encoder/` (transformers
  T5EncoderModel: config.json + safetensors) and `tokenizer/spiece.model`.
  A caption becomes its sentencepiece ids, truncated to max_len - 1, then
  </s>, then pad ids up to max_len; the encoder sees all max_len positions
  with no attention mask.
  """

  PAD, EOS = 0, 1  # T5's ids

  def __init__(self, path: str | pathlib.Path, dim: int | None = None):
    root = pathlib.Path(path)
    spiece = root / "tokenizer" / "spiece.model"
    if not spiece.is_file():
      raise FileNotFoundError(f"{root}: no tokenizer/spiece.model (expected a CogVideoX pipeline "
                              f"root with text_encoder/ and tokenizer/)")
    self.tokenizer = sentencepiece.SentencePieceProcessor(model_file=str(spiece))
    self.model = load_t5_encoder(root / "text_encoder")
    self.dim = self.model.cfg.d_model
    if dim is not None and dim != self.dim:
      raise ValueError(f"data.text_dim={dim} but the T5 encoder in {root} is {self.dim}-d")
    graph, state = nnx.split(self.model)
    forward = jax.jit(lambda state, ids: nnx.merge(graph, state)(ids))
    self._forward = lambda ids: forward(state, ids)

  def token_ids(self, captions: Sequence[str], max_len: int) -> np.ndarray:
    """[N, max_len] int32: ids[:max_len - 1] + </s>, padded."""
    ids = np.full((len(captions), max_len), self.PAD, np.int32)
    for n, caption in enumerate(captions):
      tokens = self.tokenizer.encode(caption)[:max_len - 1] + [self.EOS]
      ids[n, :len(tokens)] = tokens[:max_len]
    return ids

  def encode(self, captions: Sequence[str], max_len: int) -> tuple[Array, Array]:
    if isinstance(captions, str):
      raise TypeError("captions must be a sequence of strings, got a single str")
    ids = self.token_ids(captions, max_len)
    return self._forward(jnp.asarray(ids)), jnp.asarray(ids != self.PAD)


TEXT_ENCODERS: dict[str, Callable[..., TextEncoder]] = {"toy": ToyTextEncoder,
                                                         "t5": T5TextEncoder}


def make_text_encoder(name: str, **kwargs: Any) -> TextEncoder:
  """Build the text encoder a config names, e.g. make_text_encoder("toy", dim=64)."""
  if name not in TEXT_ENCODERS:
    raise ValueError(
        f"unknown text encoder {name!r}; known encoders: {', '.join(sorted(TEXT_ENCODERS))}")
  return TEXT_ENCODERS[name](**kwargs)
