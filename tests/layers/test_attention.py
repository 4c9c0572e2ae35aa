"""Local attention against a naive full-sequence-mask reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.layout import VideoLayout
from ttt_jax.layers.attention import local_attention
from ttt_jax.layers.rope import apply_rope, rope_angles

# text_0 = [0, 1], text_1 = [2]; frames 0, 1 -> tokens [3, 4], [5, 6]; frame 2 -> [7, 8].
LAYOUT = VideoLayout(text_lens=(2, 1), segment_frames=(2, 1), height=1, width=2)
# Window members by hand, with each member's window-local frame index (None: text).
WINDOWS = [
    {0: None, 1: None, 3: 0, 4: 0, 5: 1, 6: 1},
    {2: None, 5: 0, 6: 0, 7: 1, 8: 1},  # frame 1 is the shared boundary frame
]


def reference(q, k, v, layout, windows):
  """Full [L, L] masked softmax per window, local RoPE, mean over windows."""
  B, L, H, d = q.shape
  out, count = jnp.zeros_like(q), np.zeros(L)
  for members in windows:
    pos = np.zeros((L, 3), np.int32)
    for tok, t in members.items():
      if t is not None:
        pos[tok] = (t, *layout.positions[tok, 1:])
    angles = rope_angles(jnp.asarray(pos), d)
    qr, kr = apply_rope(q, angles), apply_rope(k, angles)
    inside = np.zeros(L, bool)
    inside[list(members)] = True
    mask = inside[:, None] & inside[None, :]  # [L, L]
    s = jnp.einsum("bqhd,bkhd->bhqk", qr, kr) / np.sqrt(d)
    p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bhqk,bkhd->bqhd", jnp.nan_to_num(p), v)
    out = out + jnp.where(inside[None, :, None, None], o, 0)
    count += inside
  return out / count[None, :, None, None]


def test_windows_match_hand_plan():
  win = LAYOUT.attention_windows
  for w, members in enumerate(WINDOWS):
    got = win.index[w][win.valid[w]]
    assert sorted(got.tolist()) == sorted(members)
    t = {int(tok): int(p[0]) for tok, p in zip(got, win.positions[w][win.valid[w]])}
    assert all(t[tok] == (lt or 0) for tok, lt in members.items())


@pytest.mark.parametrize("layout,windows", [
    (LAYOUT, WINDOWS),  # ragged windows (masked padding)
    (VideoLayout(text_lens=(1, 1), segment_frames=(1, 1), height=1, width=2),
     [{0: None, 2: 0, 3: 0}, {1: None, 2: 0, 3: 0, 4: 1, 5: 1}]),
    (VideoLayout(text_lens=(1, 2), segment_frames=(2, 1), height=1, width=1),
     [{0: None, 3: 0, 4: 1}, {1: None, 2: None, 4: 0, 5: 1}]),  # equal windows: no mask
])
def test_local_attention_matches_full_mask_reference(layout, windows):
  B, H, d = 2, 2, 16
  q, k, v = jax.random.normal(jax.random.key(0), (3, B, layout.seq_len, H, d))
  np.testing.assert_allclose(local_attention(q, k, v, layout), reference(q, k, v, layout, windows),
                             rtol=1e-5, atol=1e-5)


def test_tokens_outside_a_window_do_not_affect_it():
  q, k, v = jax.random.normal(jax.random.key(1), (3, 1, LAYOUT.seq_len, 2, 16))
  out = local_attention(q, k, v, LAYOUT)
  # Token 7 (frame 2) is only in window 1; window 0's text token 0 must not see it.
  out2 = local_attention(q, k.at[:, 7].add(3.0), v.at[:, 7].add(3.0), LAYOUT)
  np.testing.assert_allclose(out[:, :2], out2[:, :2], rtol=1e-6)
  assert float(jnp.abs(out[:, 2] - out2[:, 2]).max()) > 1e-3
