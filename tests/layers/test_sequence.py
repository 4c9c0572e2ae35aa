"""The global sequence slot: every baseline reads the video in TTT order, padding is inert,
and unknown names are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layers import sequence
from ttt_jax.layers.bidirectional import Bidirectional
from ttt_jax.layout import VideoLayout

LAYOUT = VideoLayout(text_lens=(3, 2, 4), segment_frames=(2, 1, 1), height=1, width=3)  # 21
WIDTH, HEADS = 32, 4
OPTIONS = dict(sliding_window=dict(window=6), full_attention={},
               mamba2=dict(state_dim=8, chunk_size=4, num_groups=2),
               gated_deltanet=dict(chunk_size=4), lact=dict(chunk_size=8, muon_steps=2))


def make_slot(name):
  return sequence.BASELINES[name](WIDTH, HEADS, **OPTIONS[name], rngs=nnx.Rngs(0))


def x_of(layout, seed=1):
  return jax.random.normal(jax.random.key(seed), (2, layout.seq_len, WIDTH))


@pytest.mark.parametrize("name", list(sequence.BASELINES))
@pytest.mark.parametrize("reverse", [False, True])
def test_baseline_reads_the_video_in_ttt_order(name, reverse):
  """slot(x, layout) is the bare layer (causal over its input) on x put in TTT order, put back."""
  slot = make_slot(name)
  x = x_of(LAYOUT)
  order = LAYOUT.ttt_order(reverse)
  bare = type(slot).__mro__[1].__call__(slot, x[:, order])  # the layer's own causal call
  want = np.asarray(bare)[:, np.argsort(order)]
  np.testing.assert_allclose(slot(x, LAYOUT, reverse=reverse), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(sequence.BASELINES))
def test_padding_never_reaches_real_tokens(name):
  """Padding (a context-parallel mesh's) sits last in both orders with a zero LaCT rate: real
  tokens' outputs do not depend on it."""
  slot = make_slot(name)
  x = x_of(LAYOUT)
  padded = LAYOUT.padded(8)
  junk = 3.0 * jax.random.normal(jax.random.key(5), (2, padded.pad, WIDTH))
  for reverse in (False, True):
    got = slot(jnp.concatenate([x, junk], axis=1), padded, reverse=reverse)[:, :LAYOUT.seq_len]
    np.testing.assert_allclose(got, slot(x, LAYOUT, reverse=reverse), rtol=1e-5, atol=1e-5)


def test_make_sequence_layer():
  kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert sequence.make_sequence_layer("local", WIDTH, HEADS, {}, **kw) is None
  slot = sequence.make_sequence_layer("mamba2", WIDTH, HEADS, OPTIONS["mamba2"], **kw)
  assert isinstance(slot, Bidirectional) and isinstance(slot.mamba2, sequence.Mamba2Slot)
  assert slot(x_of(LAYOUT), LAYOUT).shape == (2, LAYOUT.seq_len, WIDTH)
  with pytest.raises(ValueError, match="model.sequence_layer='rwkv' is unknown; choose from"):
    sequence.make_sequence_layer("rwkv", WIDTH, HEADS, {}, **kw)
