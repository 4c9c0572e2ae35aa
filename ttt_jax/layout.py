"""Token layout of a multi-scene video: segments, text lengths, token orders.

A video is a sequence of 3-second segments, each with its own caption. After
patchify every latent frame is a `height x width` grid of tokens. The model
keeps tokens in one canonical order,

    [text_0, text_1, ..., text_{S-1}, frame_0, frame_1, ..., frame_{T-1}]

(video tokens frame-major, then row, then column), like CogVideoX's
[text; video]. TTT reads the sequence in its own order, interleaving each
segment's caption with its frames,

    forward:  [text_0, video_0, text_1, video_1, ..., text_{S-1}, video_{S-1}]
    reverse:  [text_{S-1}, flip(video_{S-1}), ..., text_0, flip(video_0)]

i.e. the reverse pass flips every video token and reverses the order of the
text chunks, each caption still read just before its own (flipped) frames.
Segment i owns `segment_frames[i]` latent frames; in the paper the first
segment owns 13 (the VAE's lone first frame plus 12) and the others 12.

A layout may end in `pad` padding tokens (`padded(multiple)`), which
`VideoDiT` appends so that a context-parallel mesh splits the sequence
evenly: they are no segment's, take part in no attention window, sit last in
both TTT orders and get a zero inner learning rate, so real tokens never see
them.

Self-attention is local: segment i attends over its caption and its frames
plus, for i > 0, the last frame of segment i-1 (so every paper window holds
13 frames, the clip length CogVideoX was pre-trained on). That boundary frame
sits in two windows and its two outputs are averaged.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

SECONDS_PER_SEGMENT = 3
FRAMES_PER_SEGMENT = 12  # latent frames in 3 s at 16 fps with 4x temporal compression


class AttentionWindows(NamedTuple):
  """Static gather plan of the local-attention windows (S windows of Lw slots)."""

  index: np.ndarray  # [S, Lw] int32 canonical token in each slot (0 where padded)
  valid: np.ndarray  # [S, Lw] bool, False on padding slots of shorter windows
  positions: np.ndarray  # [S, Lw, 3] int32 window-LOCAL (t, h, w); text at the origin
  weight: np.ndarray  # [S, Lw] float32: 1 / (number of windows holding the token), 0 on padding


@dataclasses.dataclass(frozen=True)
class VideoLayout:
  """Where every token of a (multi-scene) video sits.

  Attributes:
    text_lens: text tokens of each segment's caption.
    segment_frames: latent frames owned by each segment (no overlap).
    height, width: token grid of one latent frame (after patchify).
    pad: padding tokens after the video (canonical order).
  """

  text_lens: tuple[int, ...]
  segment_frames: tuple[int, ...]
  height: int
  width: int
  pad: int = 0

  def __post_init__(self):
    object.__setattr__(self, "text_lens", tuple(int(n) for n in self.text_lens))
    object.__setattr__(self, "segment_frames", tuple(int(n) for n in self.segment_frames))
    if len(self.text_lens) != len(self.segment_frames) or not self.text_lens:
      raise ValueError(
          f"VideoLayout needs one text length per segment: got text_lens="
          f"{self.text_lens} for segment_frames={self.segment_frames}")
    if min(self.text_lens) < 0 or min(self.segment_frames) < 1:
      raise ValueError(
          f"VideoLayout: text_lens must be >= 0 and segment_frames >= 1, got "
          f"{self.text_lens} and {self.segment_frames}")
    if self.height < 1 or self.width < 1:
      raise ValueError(f"VideoLayout: token grid {self.height}x{self.width} is empty")
    if self.pad < 0:
      raise ValueError(f"VideoLayout: pad must be >= 0, got {self.pad}")

  @classmethod
  def from_seconds(cls, seconds: int, *, text_len: int | tuple[int, ...], height: int,
                   width: int, frames_per_segment: int = FRAMES_PER_SEGMENT) -> VideoLayout:
    """The paper's layout: 3 s segments, the first with one extra prefix frame."""
    if seconds < SECONDS_PER_SEGMENT or seconds % SECONDS_PER_SEGMENT:
      raise ValueError(f"video length must be a positive multiple of "
                       f"{SECONDS_PER_SEGMENT} s, got {seconds}")
    n = seconds // SECONDS_PER_SEGMENT
    text_lens = (text_len,) * n if isinstance(text_len, int) else tuple(text_len)
    frames = (frames_per_segment + 1,) + (frames_per_segment,) * (n - 1)
    return cls(text_lens, frames, height, width)

  # --------------------------------------------------------------- sizes ----
  @property
  def num_segments(self) -> int:
    return len(self.text_lens)

  @property
  def tokens_per_frame(self) -> int:
    return self.height * self.width

  @property
  def num_frames(self) -> int:
    return sum(self.segment_frames)

  @property
  def num_text(self) -> int:
    return sum(self.text_lens)

  @property
  def num_video(self) -> int:
    return self.num_frames * self.tokens_per_frame

  @property
  def num_real(self) -> int:
    """Text and video tokens, padding left out."""
    return self.num_text + self.num_video

  @property
  def seq_len(self) -> int:
    return self.num_real + self.pad

  def padded(self, multiple: int) -> VideoLayout:
    """This layout with padding tokens to a whole multiple of `multiple` tokens."""
    return dataclasses.replace(self, pad=-self.num_real % multiple)

  # ---------------------------------------------------- canonical order ----
  @functools.cached_property
  def is_video(self) -> np.ndarray:
    """[L] bool: True for video tokens, in canonical order."""
    return (np.arange(self.seq_len) >= self.num_text) & ~self.is_pad

  @functools.cached_property
  def is_pad(self) -> np.ndarray:
    """[L] bool: True for padding tokens (the last `pad`)."""
    return np.arange(self.seq_len) >= self.num_real

  @functools.cached_property
  def positions(self) -> np.ndarray:
    """[L, 3] int32 global (t, h, w) of every token; zeros for text tokens."""
    t, h, w = np.meshgrid(np.arange(self.num_frames), np.arange(self.height),
                          np.arange(self.width), indexing="ij")
    video = np.stack([t, h, w], axis=-1).reshape(-1, 3)
    return np.concatenate([np.zeros((self.num_text, 3), np.int64), video,
                           np.zeros((self.pad, 3), np.int64)]).astype(np.int32)

  def _segment_slices(self) -> list[tuple[np.ndarray, np.ndarray]]:
    """Canonical indices of (text_i, video_i) for every segment i."""
    text_end = np.cumsum(self.text_lens)
    frame_end = np.cumsum(self.segment_frames)
    out = []
    for i in range(self.num_segments):
      text = np.arange(text_end[i] - self.text_lens[i], text_end[i])
      f0, f1 = frame_end[i] - self.segment_frames[i], frame_end[i]
      video = self.num_text + np.arange(f0 * self.tokens_per_frame, f1 * self.tokens_per_frame)
      out.append((text, video))
    return out

  # ---------------------------------------------------------- TTT order ----
  @functools.cached_property
  def _ttt_orders(self) -> tuple[np.ndarray, np.ndarray]:
    segments = self._segment_slices()
    reversed_segments = [(text, video[::-1]) for text, video in segments[::-1]]
    pads = np.arange(self.num_real, self.seq_len)
    return tuple(
        np.concatenate([np.concatenate(pair) for pair in segs] + [pads]).astype(np.int32)
        for segs in (segments, reversed_segments))

  def ttt_order(self, reverse: bool = False) -> np.ndarray:
    """[L] canonical index of the token at each position of the TTT order."""
    return self._ttt_orders[int(reverse)]

  def from_ttt_order(self, reverse: bool = False) -> np.ndarray:
    """[L] inverse permutation: TTT-order position of each canonical token."""
    return np.argsort(self.ttt_order(reverse)).astype(np.int32)

  # ---------------------------------------------------- local attention ----
  @functools.cached_property
  def attention_windows(self) -> AttentionWindows:
    """Segment i: [text_i; (last frame of segment i-1); frames of segment i]."""
    windows = []
    for i, (text, video) in enumerate(self._segment_slices()):
      if i:
        video = np.concatenate([video[:self.tokens_per_frame] - self.tokens_per_frame, video])
      windows.append(np.concatenate([text, video]))
    lw = max(len(w) for w in windows)
    index = np.zeros((self.num_segments, lw), np.int32)
    valid = np.zeros((self.num_segments, lw), bool)
    positions = np.zeros((self.num_segments, lw, 3), np.int32)
    for i, w in enumerate(windows):
      index[i, :len(w)] = w
      valid[i, :len(w)] = True
      pos = self.positions[w]
      is_video = self.is_video[w]
      pos[is_video, 0] -= pos[is_video, 0].min()  # time local to the window
      positions[i, :len(w)] = pos
    counts = np.bincount(index[valid], minlength=self.seq_len)
    weight = np.where(valid, 1.0 / counts[index], 0.0).astype(np.float32)
    return AttentionWindows(index, valid, positions, weight)
