"""Long-range consistency probe for toy cartoons: which character colours a video shows.

A toy cartoon names its characters' colours only in the first caption. The
probe reads the colours back from decoded frames, with no knowledge of where
the characters are (a generated video moves them its own way):

- every pixel is labelled with the nearest colour of the toy universe (the
  character PALETTE plus every colour the backgrounds use), and kept as a
  palette colour only if it lies within `max_distance` of it;
- a palette colour is present in a frame when it covers at least
  `min_area` of the smallest character's area (the mouse), and present in a
  segment when it is present in at least half of the segment's frames.

A video's `consistency` is the mean over segments after the first of the F1
between the colours present and the colours of the first caption; its
`self_consistency` compares them with the colours present in the first
segment instead, i.e. whether the video keeps what it drew, whether or not
that matched the caption. `recolour` makes the negative control: a video
whose character changes colour after the first scene.

A painted house (`ToyCartoonConfig.paints`) is read by `paints_per_segment`:
every pixel of the wall band (above `FLOOR`) and of the floor band is
labelled with the nearest colour of the universe (paints, their shades,
characters, backdrop features), a paint and its shade counting as the paint;
the paint with the most pixels of a band, if it holds at least `min_share`
of them, is that band's paint. Characters and features cover a minority of
each band, so this reads the paint exactly on ground truth, also through the
codec. `repaint` makes its negative control.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from ttt_jax.data.toy_cartoons import (BACKGROUNDS, FLOOR, PAINT_SHADE, PAINTS, PALETTE,
                                       SPECIES, ToyVideo, render_background,
                                       segment_frame_ranges)

COLOURS = tuple(PALETTE)  # the probe's output order


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
  """max_distance: RGB distance (0-441) within which a pixel counts as a palette colour.
  min_area: fraction of the smallest character's area a colour must cover in a frame.
  frame_stride: every n-th frame of a segment is read (the probe's cost).
  candidates: the colours characters can have (the dataset's `colours`); the other palette
  colours still compete as nearest colours, but are never reported (edge blends of two
  colours and of backdrops read as grey or brown)."""
  max_distance: float = 60.0
  min_area: float = 0.2
  frame_stride: int = 4
  candidates: tuple[str, ...] = COLOURS


@functools.lru_cache(maxsize=None)
def _background_colours() -> np.ndarray:
  """[N, 3] every colour any backdrop paints (resolution-independent up to aliasing)."""
  colours = np.concatenate([render_background(b, 96, 144).reshape(-1, 3) for b in BACKGROUNDS])
  return np.unique(colours, axis=0).astype(np.float32)


def palette_masks(frames: np.ndarray, config: ProbeConfig = ProbeConfig()) -> np.ndarray:
  """uint8 [T, H, W, 3] -> bool [T, H, W, P]: pixels read as each palette colour."""
  palette = np.array([PALETTE[c] for c in COLOURS], np.float32)  # [P, 3]
  universe = np.concatenate([palette, _background_colours()])  # [P + N, 3]
  x = frames.astype(np.float32)[..., None, :]  # [T, H, W, 1, 3]
  dist = np.sqrt(((x - universe) ** 2).sum(-1))  # [T, H, W, P + N]
  nearest = dist.argmin(-1)  # [T, H, W]
  close = dist[..., :len(palette)].min(-1) <= config.max_distance
  return (nearest[..., None] == np.arange(len(palette))) & close[..., None]


def colours_per_segment(frames: np.ndarray, num_segments: int,
                        config: ProbeConfig = ProbeConfig()) -> list[frozenset[str]]:
  """The palette colours present in each segment of a toy-cartoon-shaped video.

  frames: uint8 [T, H, W, 3] with T = 48 * num_segments + 1.
  """
  T, H = frames.shape[0], frames.shape[1]
  ranges = segment_frame_ranges(num_segments)
  if T != ranges[-1][1]:
    raise ValueError(f"frames has {T} frames; {num_segments} segments need {ranges[-1][1]}")
  smallest = min(s.radius for s in SPECIES.values())
  min_pixels = config.min_area * 2.0 * (smallest * H) ** 2  # a triangle of half-extent r: 2 r^2
  present = []
  for f0, f1 in ranges:
    picked = frames[f0:f1:config.frame_stride]  # [n, H, W, 3]
    area = palette_masks(picked, config).sum((1, 2))  # [n, P]
    votes = (area >= min_pixels).mean(0)  # [P]
    present.append(frozenset(c for c, v in zip(COLOURS, votes)
                             if v >= 0.5 and c in config.candidates))
  return present


def f1(found: frozenset[str], wanted: frozenset[str]) -> float:
  """F1 of two colour sets (1.0 when both are empty)."""
  if not found and not wanted:
    return 1.0
  hits = len(found & wanted)
  return 2.0 * hits / (len(found) + len(wanted))


def consistency(present: list[frozenset[str]], caption_colours: frozenset[str]
                ) -> dict[str, float]:
  """{"consistency", "self_consistency", "first_segment"} of one video's per-segment colours.

  consistency: mean F1 of the later segments' colours vs the first caption's;
  self_consistency: the same vs the colours of the first segment (0 if it shows
  none); first_segment: F1 of the first segment vs the caption (does the model
  render the colours at all).
  """
  if len(present) < 2:
    raise ValueError(f"consistency needs at least 2 segments, got {len(present)}")
  later = present[1:]
  return {
      "consistency": float(np.mean([f1(p, caption_colours) for p in later])),
      # A first segment with no character colour has nothing to keep: 0, not F1(empty, empty).
      "self_consistency": float(np.mean([f1(p, present[0]) for p in later]))
                          if present[0] else 0.0,
      "first_segment": f1(present[0], caption_colours),
  }


def caption_colours(video: ToyVideo) -> frozenset[str]:
  """The colours the first caption names (the ground truth the probe is scored against)."""
  return frozenset(c["colour"] for c in video.attributes["characters"])


def recolour(video: ToyVideo, character: int, colour: str) -> np.ndarray:
  """Frames of `video` where `character` wears `colour` from the second scene on (or from the
  second segment if there is one scene): the probe's negative control."""
  if colour not in PALETTE:
    raise ValueError(f"unknown colour {colour!r}; choose from {COLOURS}")
  scenes = video.scenes
  first = next((i for i, s in enumerate(scenes) if s != scenes[0]), 1)
  start = video.attributes["segments"][first]["frames"][0]
  old = np.array(video.attributes["characters"][character]["rgb"], np.uint8)
  frames = video.frames.copy()
  tail = frames[start:]  # [T', H, W, 3] view
  tail[(tail == old).all(-1)] = PALETTE[colour]  # flat colours: exact matches are the character
  return frames


# ----------------------------------------------------------------------------- paint


@dataclasses.dataclass(frozen=True)
class PaintProbeConfig:
  """min_share: fraction of a band's pixels its paint must hold (else the band reads None).
  frame_stride: every n-th frame of a segment is read."""
  min_share: float = 0.3
  frame_stride: int = 4


@functools.lru_cache(maxsize=None)
def _paint_universe() -> tuple[np.ndarray, np.ndarray]:
  """([N, 3] colours, [N] index into PAINTS or -1): the paints, their shades, and every
  other colour a painted video can show (characters, backdrop features)."""
  paints = np.array(list(PAINTS.values()), np.float64)
  shades = np.round(paints * PAINT_SHADE)
  # A painted room's features, whatever the paint (its unpainted walls never show: the
  # night street's is close to navy).
  names = tuple(PAINTS)[:2]
  painted = np.unique(np.concatenate([render_background(b, 96, 144, names).reshape(-1, 3)
                                      for b in BACKGROUNDS]), axis=0).astype(np.float64)
  features = painted[~(painted[:, None] == np.concatenate([paints, shades])[None]).all(-1).any(1)]
  others = np.concatenate([np.array(list(PALETTE.values()), np.float64), features])
  colours = np.concatenate([paints, shades, others]).astype(np.float32)
  owner = np.concatenate([np.arange(len(PAINTS)), np.arange(len(PAINTS)),
                          np.full(len(others), -1)])
  return colours, owner


def paints_per_segment(frames: np.ndarray, num_segments: int,
                       config: PaintProbeConfig = PaintProbeConfig()
                       ) -> list[tuple[str | None, str | None]]:
  """(wall, floor) paint of each segment of a painted toy cartoon (None: no paint holds
  `min_share` of that band). frames: uint8 [T, H, W, 3], T = 48 * num_segments + 1."""
  T, H = frames.shape[0], frames.shape[1]
  ranges = segment_frame_ranges(num_segments)
  if T != ranges[-1][1]:
    raise ValueError(f"frames has {T} frames; {num_segments} segments need {ranges[-1][1]}")
  colours, owner = _paint_universe()
  names = tuple(PAINTS)
  boundary = int(round(FLOOR * H))
  out = []
  for f0, f1 in ranges:
    x = frames[f0:f1:config.frame_stride].astype(np.float32)[..., None, :]  # [n, H, W, 1, 3]
    label = owner[((x - colours) ** 2).sum(-1).argmin(-1)]  # [n, H, W] paint index or -1
    read = []
    for band in (label[:, :boundary], label[:, boundary:]):
      counts = np.bincount(band[band >= 0], minlength=len(names))  # [P]
      best = int(counts.argmax())
      read.append(names[best] if counts[best] >= config.min_share * band.size else None)
    out.append(tuple(read))
  return out


def paint_agreement(read: list[tuple[str | None, str | None]], paint: tuple[str, str],
                    segments: range | list[int]) -> float:
  """Mean over `segments` of the fraction of (wall, floor) read as `paint`."""
  if not len(segments):
    raise ValueError("paint_agreement needs at least one segment")
  return float(np.mean([np.mean([r == p for r, p in zip(read[i], paint)]) for i in segments]))


def caption_paint(video: ToyVideo) -> tuple[str, str]:
  """The (wall, floor) paint the first caption names."""
  paint = video.attributes["paint"]
  if paint is None:
    raise ValueError("the video's house is not painted (ToyCartoonConfig.paints is empty)")
  return paint["wall"], paint["floor"]


def repaint(video: ToyVideo, paint: tuple[str, str], start_segment: int) -> np.ndarray:
  """Frames of a painted `video` whose walls and floor take `paint` from `start_segment` on
  (characters and features untouched): the paint probe's negative control."""
  old = caption_paint(video)
  frames = video.frames.copy()
  tail = frames[video.attributes["segments"][start_segment]["frames"][0]:]  # view
  rgb = lambda name, scale: np.round(np.asarray(PAINTS[name], np.float64) * scale).astype(np.uint8)
  # Every mask before any write, so a paint moving onto the other band's old one is not
  # repainted twice. Flat colours: exact matches are the paint.
  changes = [((tail == rgb(was, scale)).all(-1), rgb(new, scale))
             for was, new in zip(old, paint) for scale in (1.0, PAINT_SHADE)]
  for mask, colour in changes:
    tail[mask] = colour
  return frames
