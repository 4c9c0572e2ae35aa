"""Token layout: paper sizes, hand-checked TTT orders, permutations."""

import numpy as np
import pytest

from ttt_jax.layout import VideoLayout


@pytest.mark.parametrize("seconds,frames", [(3, 13), (9, 37), (18, 73), (30, 121), (63, 253)])
def test_paper_latent_frame_counts(seconds, frames):
  layout = VideoLayout.from_seconds(seconds, text_len=458, height=30, width=45)
  assert layout.num_frames == frames
  assert layout.num_segments == seconds // 3


def test_paper_63s_sequence_length_divides_minibatch():
  # REFERENCE: the 63 s video is 351,168 tokens and divides K = 64.
  layout = VideoLayout.from_seconds(63, text_len=458, height=30, width=45)
  assert layout.seq_len == 351_168 and layout.seq_len % 64 == 0
  assert layout.num_video == 253 * 1350


def test_ttt_orders_by_hand():
  # text_0 = [0, 1], text_1 = [2]; video_0 = frames 0-1 = [3..6], video_1 = frame 2 = [7, 8].
  layout = VideoLayout(text_lens=(2, 1), segment_frames=(2, 1), height=1, width=2)
  np.testing.assert_array_equal(layout.ttt_order(), [0, 1, 3, 4, 5, 6, 2, 7, 8])
  np.testing.assert_array_equal(layout.ttt_order(reverse=True), [2, 8, 7, 0, 1, 6, 5, 4, 3])


def test_single_scene_forward_order_is_canonical():
  layout = VideoLayout.from_seconds(3, text_len=5, height=2, width=3)
  np.testing.assert_array_equal(layout.ttt_order(), np.arange(layout.seq_len))


@pytest.mark.parametrize("reverse", [False, True])
def test_orders_are_permutations_with_inverse(reverse):
  layout = VideoLayout(text_lens=(3, 0, 4), segment_frames=(3, 2, 2), height=2, width=3)
  order = layout.ttt_order(reverse)
  np.testing.assert_array_equal(np.sort(order), np.arange(layout.seq_len))
  np.testing.assert_array_equal(order[layout.from_ttt_order(reverse)], np.arange(layout.seq_len))


def test_positions_and_video_mask():
  layout = VideoLayout(text_lens=(2, 1), segment_frames=(2, 1), height=2, width=3)
  assert layout.is_video.sum() == layout.num_video == 18
  assert not layout.is_video[:3].any()
  np.testing.assert_array_equal(layout.positions[:3], 0)
  # token 3 + (t * 6 + h * 3 + w) sits at (t, h, w)
  np.testing.assert_array_equal(layout.positions[3 + 2 * 6 + 1 * 3 + 2], [2, 1, 2])


def test_bad_layouts_name_the_problem():
  with pytest.raises(ValueError, match="one text length per segment"):
    VideoLayout(text_lens=(2,), segment_frames=(2, 1), height=1, width=1)
  with pytest.raises(ValueError, match="multiple of 3 s"):
    VideoLayout.from_seconds(10, text_len=4, height=1, width=1)
  with pytest.raises(ValueError, match="segment_frames >= 1"):
    VideoLayout(text_lens=(2, 2), segment_frames=(2, 0), height=1, width=1)


def test_padded_layout_appends_padding_that_no_segment_owns():
  layout = VideoLayout(text_lens=(2, 1), segment_frames=(2, 1), height=1, width=2)  # 9 tokens
  padded = layout.padded(4)
  assert (padded.pad, padded.seq_len, padded.num_real) == (3, 12, 9)
  assert layout.padded(3) == layout  # already a multiple
  np.testing.assert_array_equal(padded.is_pad, [False] * 9 + [True] * 3)
  assert not padded.is_video[9:].any() and padded.is_video.sum() == layout.num_video
  np.testing.assert_array_equal(padded.positions[9:], 0)
  # Both TTT orders keep the real tokens' orders and put the padding last.
  for reverse in (False, True):
    np.testing.assert_array_equal(padded.ttt_order(reverse)[:9], layout.ttt_order(reverse))
    np.testing.assert_array_equal(padded.ttt_order(reverse)[9:], [9, 10, 11])
  # No attention window holds a padding token.
  win, padded_win = layout.attention_windows, padded.attention_windows
  np.testing.assert_array_equal(padded_win.index, win.index)
  np.testing.assert_array_equal(padded_win.weight, win.weight)
  with pytest.raises(ValueError, match="pad must be >= 0"):
    VideoLayout(text_lens=(1,), segment_frames=(1,), height=1, width=1, pad=-1)
