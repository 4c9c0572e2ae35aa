"""Toy cartoons: procedural multi-scene "cat and mouse" videos with storyboards.

The embedded default dataset, small enough to train a tiny video diffusion
model on a CPU while keeping the structure of the paper's data: 16 fps, one
caption per 3-second segment (48 frames) plus one leading frame, so n
segments -> 48 n + 1 frames, matching `VideoLayout.from_seconds` (the first
segment owns the extra frame). Consecutive segments form scenes of 1-3
segments on a shared background; motion is continuous inside a scene and
may teleport at a scene cut.

Characters are flat shapes (cat = disc, mouse = triangle, dog = square) whose
colours are drawn per video and named ONLY in the first caption, so a model
must carry them across the whole video: the long-range consistency probe.
With `paints`, the house is painted too: every scene's walls and floor take
two colours drawn per video ("The walls are teal and the floor is pink."),
also named only in the first caption (or in every caption, with
`restate_paint`: the oracle storyboard). Walls and floor cover the frame at
known places, so remembering them is worth far more of the diffusion loss
than the characters' colours (ttt_jax/evaluation/video.py).
All geometry is planned in units of the frame height (x in [0, W / H]) and
then rasterised, so one (seed, index) gives the same video at any resolution
of the same aspect ratio.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import grain.python as grain
import numpy as np

from ttt_jax.layout import SECONDS_PER_SEGMENT

FPS = 16
SEGMENT_FRAMES = FPS * SECONDS_PER_SEGMENT  # 48 RGB frames per 3 s segment
MIN_ASPECT = 1.25  # three characters need this much floor to stand and run


@dataclasses.dataclass(frozen=True)
class Species:
  """A character: its shape and half-extent (in frame heights)."""
  shape: str  # "disc" | "square" | "triangle" (pointing up)
  radius: float


SPECIES: dict[str, Species] = {
    "cat": Species("disc", 0.13),
    "mouse": Species("triangle", 0.09),
    "dog": Species("square", 0.17),
}

# Character colours: saturated, none equal to a background colour.
PALETTE: dict[str, tuple[int, int, int]] = {
    "orange": (245, 130, 20),
    "grey": (140, 140, 150),
    "brown": (120, 70, 30),
    "white": (250, 250, 250),
    "black": (25, 25, 25),
    "blue": (40, 90, 220),
    "red": (220, 40, 40),
    "purple": (130, 60, 180),
    "yellow": (250, 215, 40),
}

BACKGROUNDS = ("kitchen", "garden", "living room", "night street")

# House paints: wall and floor colours of a painted video (`ToyCartoonConfig.paints`). Each is
# >= 68 RGB apart from every other paint and >= 90 from the evaluation's character colours
# (orange, blue, red, purple, yellow), so the probes tell walls, floors and characters apart.
PAINTS: dict[str, tuple[int, int, int]] = {
    "green": (60, 160, 70),
    "teal": (30, 140, 140),
    "pink": (240, 150, 200),
    "cream": (235, 225, 170),
    "navy": (30, 35, 90),
    "maroon": (110, 30, 50),
}
PAINT_SHADE = 0.75  # floor patterns and wall stripes of a painted room: the paint, darker

# Layout of every scene, in frame heights from the top.
FLOOR = 0.7  # wall above, floor band below (in frame heights from the top)
_GROUND = 0.82  # where the characters' feet rest
# Horizontal planning, in frame heights.
_EDGE = 0.05  # closest a character's side gets to the frame edge
_GAP = 0.08  # closest two characters stand (side to side)
_START_GAP = 0.15  # spacing when a scene opens
_RUN = (0.3, 0.7)  # distance of a run or of the fleeing leg of a chase
_MIN_WALK = 0.15
_HOP_APEX = 0.3  # one hop per segment; n hops reach 0.3 / sqrt(n)
_JUMP_CLEARANCE = 0.12  # a jump-over peaks this far above the other's head

_ACTION_WEIGHTS = {"chase": 3.0, "run": 2.0, "jump_over": 2.0, "hop": 1.0, "walk_to": 1.0}
ACTION_KINDS = tuple(_ACTION_WEIGHTS)
_ACTION_TEXT = {
    "chase": "the {a} chases the {b} to the {d}.",
    "run": "the {a} runs to the {d}.",
    "jump_over": "the {a} jumps over the {b}.",
    "hop": "the {a} jumps {n}.",
    "walk_to": "the {a} walks up to the {b}.",
}
_HOP_COUNTS = {1: "once", 2: "twice", 3: "three times"}


@dataclasses.dataclass(frozen=True)
class ToyCartoonConfig:
  """A toy-cartoon dataset: `num_videos` videos of `seconds` at height x width."""
  seconds: int = 3
  height: int = 32
  width: int = 48
  seed: int = 0
  num_videos: int = 64
  # The colours characters are drawn from (all of PALETTE by default). The evaluation uses
  # a subset that stays apart after the latent codec (ttt_jax/data/toy_probe.py).
  colours: tuple[str, ...] = tuple(PALETTE)
  # House paints the walls and floor are drawn from (two distinct ones per video, named in
  # the first caption); () keeps every backdrop's own colours.
  paints: tuple[str, ...] = ()
  # Every caption names the paint, not only the first (the oracle storyboard).
  restate_paint: bool = False

  def __post_init__(self):
    if self.seconds < SECONDS_PER_SEGMENT or self.seconds % SECONDS_PER_SEGMENT:
      raise ValueError(f"ToyCartoonConfig.seconds must be a positive multiple of "
                       f"{SECONDS_PER_SEGMENT}, got {self.seconds}")
    for field in ("height", "width"):
      value = getattr(self, field)
      if value < 16 or value % 16:
        raise ValueError(f"ToyCartoonConfig.{field} must be a positive multiple of 16, "
                         f"got {value}")
    if self.width < MIN_ASPECT * self.height:
      raise ValueError(f"ToyCartoonConfig.width must be >= {MIN_ASPECT} * height so the "
                       f"characters have room to run, got {self.height}x{self.width}")
    if self.seed < 0:
      raise ValueError(f"ToyCartoonConfig.seed must be >= 0, got {self.seed}")
    if self.num_videos < 1:
      raise ValueError(f"ToyCartoonConfig.num_videos must be >= 1, got {self.num_videos}")
    unknown = [c for c in self.colours if c not in PALETTE]
    if unknown or len(set(self.colours)) < len(SPECIES):
      raise ValueError(f"ToyCartoonConfig.colours must name at least {len(SPECIES)} distinct "
                       f"colours of {tuple(PALETTE)}, got {self.colours}")
    if self.paints and (any(p not in PAINTS for p in self.paints)
                        or len(set(self.paints)) < 2):
      raise ValueError(f"ToyCartoonConfig.paints must be empty or name at least 2 distinct "
                       f"paints of {tuple(PAINTS)}, got {self.paints}")
    if self.restate_paint and not self.paints:
      raise ValueError("ToyCartoonConfig.restate_paint needs paints")

  @property
  def num_segments(self) -> int:
    return self.seconds // SECONDS_PER_SEGMENT

  @property
  def num_frames(self) -> int:
    return num_frames(self.seconds)


@dataclasses.dataclass(frozen=True, eq=False)
class ToyVideo:
  """One generated video with its storyboard and ground truth.

  Attributes:
    frames: uint8 [T, H, W, 3] RGB, T = 48 * num_segments + 1.
    captions: one storyboard line per segment.
    scenes: scene index of every segment (non-decreasing from 0).
    attributes: JSON-serialisable ground truth: characters (species, colour,
      rgb, shape, radius in px, per-frame [y, x] centre in px with pixel (i, j)
      centred at (i + 0.5, j + 0.5)) and per-segment background, action,
      frame range.
  """
  frames: np.ndarray
  captions: tuple[str, ...]
  scenes: tuple[int, ...]
  attributes: dict[str, Any]


def num_frames(seconds: int) -> int:
  """RGB frames of a `seconds`-long video: 48 per segment plus a leading one."""
  return SEGMENT_FRAMES * (seconds // SECONDS_PER_SEGMENT) + 1


def segment_frame_ranges(num_segments: int) -> list[tuple[int, int]]:
  """[start, stop) frames of each segment; the first owns the leading frame."""
  return [(0 if i == 0 else 1 + SEGMENT_FRAMES * i, 1 + SEGMENT_FRAMES * (i + 1))
          for i in range(num_segments)]


def frames_to_float(frames: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1], the diffusion model's pixel range."""
  return frames.astype(np.float32) / 127.5 - 1.0


# ----------------------------------------------------------------------------
# Planning: where every character is in every frame (frame-height units).
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Action:
  kind: str
  actor: int
  target: int | None = None
  direction: int = 0  # -1 left, +1 right
  hops: int = 0


def _room(x: np.ndarray, radii: np.ndarray, k: int, d: int, aspect: float,
          start: float | None = None, skip: tuple[int, ...] = ()) -> float:
  """How far character k can move from `start` in direction d before a wall or another."""
  start = x[k] if start is None else start
  room = (aspect - _EDGE - radii[k] - start) if d > 0 else (start - _EDGE - radii[k])
  for j in range(len(x)):
    if j != k and j not in skip and (x[j] - start) * d > 0:
      room = min(room, abs(x[j] - start) - radii[j] - radii[k] - _GAP)
  return float(room)


def _between(x: np.ndarray, a: int, b: int) -> bool:
  """Whether a third character stands between a and b."""
  lo, hi = sorted((x[a], x[b]))
  return any(lo < x[j] < hi for j in range(len(x)) if j not in (a, b))


def _jump_half(x: np.ndarray, radii: np.ndarray, a: int, b: int) -> float:
  """Half the span of a's hop over b, centred on b: take-off from at most 1.5 body widths."""
  return float(min(abs(x[b] - x[a]), 1.5 * (radii[a] + radii[b])))


def _sample_action(rng: np.random.Generator, x: np.ndarray, radii: np.ndarray,
                   aspect: float) -> tuple[_Action, np.ndarray]:
  """Pick a feasible action from the current positions; returns it and the end positions."""
  k_all = range(len(x))
  pairs = [(a, b) for a in k_all for b in k_all if a != b and not _between(x, a, b)]
  options: dict[str, list[_Action]] = {kind: [] for kind in _ACTION_WEIGHTS}
  for a in k_all:
    options["hop"].append(_Action("hop", a))
    for d in (-1, 1):
      if _room(x, radii, a, d, aspect) >= _RUN[0]:
        options["run"].append(_Action("run", a, direction=d))
  for a, b in pairs:
    d = 1 if x[b] > x[a] else -1
    if _room(x, radii, b, d, aspect) >= _RUN[0]:
      options["chase"].append(_Action("chase", a, b, d))
    if abs(x[b] - x[a]) - radii[a] - radii[b] - _GAP >= _MIN_WALK:
      options["walk_to"].append(_Action("walk_to", a, b, d))
    if _room(x, radii, a, d, aspect, start=x[b], skip=(b,)) >= _jump_half(x, radii, a, b):
      options["jump_over"].append(_Action("jump_over", a, b, d))

  kinds = [kind for kind in _ACTION_WEIGHTS if options[kind]]
  weights = np.array([_ACTION_WEIGHTS[kind] for kind in kinds])
  kind = kinds[rng.choice(len(kinds), p=weights / weights.sum())]
  action = options[kind][rng.integers(len(options[kind]))]

  a, b, d = action.actor, action.target, action.direction
  end = x.copy()
  if kind == "hop":
    action = dataclasses.replace(action, hops=int(rng.integers(1, 4)))
  elif kind == "run":
    end[a] += d * rng.uniform(_RUN[0], min(_RUN[1], _room(x, radii, a, d, aspect)))
  elif kind == "chase":
    end[b] += d * rng.uniform(_RUN[0], min(_RUN[1], _room(x, radii, b, d, aspect)))
    end[a] = end[b] - d * (radii[a] + radii[b] + _GAP)
  elif kind == "walk_to":
    end[a] = x[b] - d * (radii[a] + radii[b] + _GAP)
  else:  # jump_over: land as far past b as the hop took off before it
    end[a] = x[b] + d * _jump_half(x, radii, a, b)
  return action, end


def _trajectory(action: _Action, start: np.ndarray, end: np.ndarray, radii: np.ndarray,
                u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """x [K, N] and lift above the ground [K, N] at segment progress u [N] in [0, 1]."""
  ease = 3 * u**2 - 2 * u**3 if action.kind == "walk_to" else u
  x = start[:, None] + (end - start)[:, None] * ease[None]  # [K, N]
  lift = np.zeros_like(x)
  a, b = action.actor, action.target
  if action.kind == "hop":
    s = np.mod(action.hops * u, 1.0)
    lift[a] = _HOP_APEX / np.sqrt(action.hops) * 4 * s * (1 - s)
  elif action.kind == "jump_over":
    # One parabola while a is within `half` of b, peaking above b's head.
    half = abs(end[a] - start[b])
    s = np.clip((x[a] - start[b]) * action.direction / (2 * half) + 0.5, 0.0, 1.0)
    lift[a] = (2 * radii[b] + _JUMP_CLEARANCE) * 4 * s * (1 - s)
  return x, lift


def _opening_positions(rng: np.random.Generator, radii: np.ndarray, aspect: float) -> np.ndarray:
  """Random non-overlapping x of every character when a scene opens."""
  order = rng.permutation(len(radii))
  free = aspect - 2 * _EDGE - 2 * radii.sum() - (len(radii) - 1) * _START_GAP
  slack = rng.dirichlet(np.ones(len(radii) + 1)) * free  # [K + 1]
  x = np.empty(len(radii))
  cursor = _EDGE + slack[0]
  for i, k in enumerate(order):
    x[k] = cursor + radii[k]
    cursor += 2 * radii[k] + _START_GAP + slack[i + 1]
  return x


def _scene_lengths(rng: np.random.Generator, num_segments: int) -> list[int]:
  """Segments per scene, each 1..3, summing to `num_segments`."""
  lengths = []
  while sum(lengths) < num_segments:
    lengths.append(int(rng.integers(1, 4)))
  lengths[-1] -= sum(lengths) - num_segments
  return lengths


# ----------------------------------------------------------------------------
# Rendering.
# ----------------------------------------------------------------------------


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
  """Pixel-centre coordinates in frame heights: y [H, 1], x [1, W]."""
  return ((np.arange(height) + 0.5) / height)[:, None], ((np.arange(width) + 0.5) / height)[None]


def render_background(name: str, height: int, width: int,
                      paint: tuple[str, str] | None = None) -> np.ndarray:
  """uint8 [H, W, 3] flat-colour backdrop: a wall with one feature over a floor band.

  paint: (wall, floor) names of PAINTS: the wall and floor take them (their stripes and
  tiles a darker shade, PAINT_SHADE), the features (window, sun, fence, picture, moon,
  road line) keep their own colours. None: the backdrop's own colours."""
  y, x = _grid(height, width)
  aspect = width / height
  img = np.zeros((height, width, 3), np.uint8)
  wall, floor = y < FLOOR, y >= FLOOR  # [H, 1]

  def paint_mask(mask: np.ndarray, rgb: tuple[int, int, int]):
    img[np.broadcast_to(mask, (height, width))] = rgb

  def surface(part: int, own: tuple[int, int, int], shaded: bool = False
              ) -> tuple[int, int, int]:
    """The colour of the wall (part 0) or the floor (part 1): its own, or the paint's."""
    if paint is None:
      return own
    rgb = np.asarray(PAINTS[paint[part]], np.float64)
    return tuple(int(v) for v in np.round(rgb * (PAINT_SHADE if shaded else 1.0)))

  if name == "kitchen":
    paint_mask(wall, surface(0, (240, 228, 170)))
    window = (np.abs(y - 0.3) < 0.16) & (np.abs(x - aspect / 2) < 0.22)
    paint_mask(window, (255, 255, 255))
    paint_mask(window & (np.abs(y - 0.3) < 0.13) & (np.abs(x - aspect / 2) < 0.19),
               (170, 215, 245))
    tiles = (np.floor(x / 0.125) + np.floor((y - FLOOR) / 0.125)) % 2 == 0
    paint_mask(floor, surface(1, (225, 200, 150)))
    paint_mask(floor & tiles, surface(1, (190, 120, 80), shaded=True))
  elif name == "garden":
    paint_mask(wall, surface(0, (150, 205, 240)))
    paint_mask((y - 0.18) ** 2 + (x - (aspect - 0.25)) ** 2 < 0.1**2, (250, 235, 110))
    fence = (y > 0.45) & (y < FLOOR) & (np.mod(x, 0.2) < 0.07)
    paint_mask(fence | ((np.abs(y - 0.52) < 0.025) & (y < FLOOR)), (235, 235, 225))
    paint_mask(floor, surface(1, (80, 165, 70)))
    paint_mask(floor & (np.mod(x + 2 * y, 0.3) < 0.05), surface(1, (65, 140, 55), shaded=True))
  elif name == "living room":
    paint_mask(wall, surface(0, (215, 190, 160)))
    paint_mask(wall & (np.mod(x, 0.2) < 0.1), surface(0, (200, 170, 140), shaded=True))
    frame = (np.abs(y - 0.3) < 0.13) & (np.abs(x - 0.3) < 0.17)
    paint_mask(frame, (110, 70, 40))
    paint_mask(frame & (np.abs(y - 0.3) < 0.1) & (np.abs(x - 0.3) < 0.14), (120, 180, 150))
    paint_mask(floor, surface(1, (50, 110, 110)))
    paint_mask(np.abs(y - FLOOR - 0.02) < 0.02, (100, 70, 40))
  elif name == "night street":
    paint_mask(wall, surface(0, (25, 30, 70)))
    paint_mask((y - 0.2) ** 2 + (x - 0.3) ** 2 < 0.09**2, (240, 240, 200))
    paint_mask(wall & (np.mod(7 * x + 13 * y, 0.9) < 0.03) & (y < 0.5), (200, 200, 230))
    paint_mask(floor, surface(1, (70, 70, 78)))
    paint_mask((np.abs(y - 0.9) < 0.015) & (np.mod(x, 0.3) < 0.15), (240, 210, 60))
  else:
    raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")
  return img


def _shape_masks(shape: str, cy: np.ndarray, cx: np.ndarray, r: float, y: np.ndarray,
                 x: np.ndarray) -> np.ndarray:
  """[N, H, W] pixels covered by a shape centred at (cy, cx) [N], all in frame heights."""
  dy = y[None] - cy[:, None, None]  # [N, H, 1]
  dx = x[None] - cx[:, None, None]  # [N, 1, W]
  if shape == "disc":
    return dy**2 + dx**2 <= r**2
  if shape == "square":
    return (np.abs(dy) <= r) & (np.abs(dx) <= r)
  # Triangle pointing up: apex at cy - r, base of half-width r at cy + r.
  return (np.abs(dy) <= r) & (np.abs(dx) <= (dy + r) / 2)


# ----------------------------------------------------------------------------
# Captions.
# ----------------------------------------------------------------------------


def _caption(action: _Action, cast: list[str], background: str, colours: list[str] | None,
             opens_scene: bool, paint: tuple[str, str] | None = None) -> str:
  """Storyboard line; colours (first segment only) introduce the whole cast; paint (first
  segment, or every one when restated) names the walls' and floor's colours first."""
  b = cast[action.target] if action.target is not None else ""
  sentence = _ACTION_TEXT[action.kind].format(
      a=cast[action.actor], b=b, d="left" if action.direction < 0 else "right",
      n=_HOP_COUNTS.get(action.hops, ""))
  if colours is not None:
    named = [f"{'an' if c[0] in 'aeiou' else 'a'} {c} {s}" for c, s in zip(colours, cast)]
    cast_text = ", ".join(named[:-1]) + " and " + named[-1]
    sentences = [f"{cast_text} are in the {background}.", sentence]
  elif opens_scene:
    sentences = [f"in the {background}, {sentence}"]
  else:
    sentences = [sentence]
  if paint is not None:
    sentences.insert(0, f"the walls are {paint[0]} and the floor is {paint[1]}.")
  return " ".join(t[0].upper() + t[1:] for t in sentences)


def _storyboard(attributes: dict[str, Any], scenes: Sequence[int]) -> tuple[str, ...]:
  """Every segment's caption from a video's ground truth (`ToyVideo.attributes`)."""
  cast = [c["species"] for c in attributes["characters"]]
  colours = [c["colour"] for c in attributes["characters"]]
  paint = attributes["paint"] and (attributes["paint"]["wall"], attributes["paint"]["floor"])
  captions = []
  for i, seg in enumerate(attributes["segments"]):
    action = _Action(seg["action"], cast.index(seg["actor"]),
                     None if seg["target"] is None else cast.index(seg["target"]),
                     {"left": -1, None: 0, "right": 1}[seg["direction"]], seg["hops"] or 0)
    captions.append(_caption(action, cast, seg["background"], colours if i == 0 else None,
                             i == 0 or scenes[i] != scenes[i - 1],
                             paint if i == 0 or attributes["restate_paint"] else None))
  return tuple(captions)


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def generate_video(config: ToyCartoonConfig, index: int) -> ToyVideo:
  """Video `index` of the dataset; a pure function of (config, index)."""
  index = int(index)
  if index < 0:
    raise ValueError(f"video index must be >= 0, got {index}")
  rng = np.random.default_rng([config.seed, index])
  h, w = config.height, config.width
  aspect = w / h

  # Cat and mouse always star; the dog joins half the videos.
  cast = ["cat", "mouse"] + (["dog"] if rng.random() < 0.5 else [])
  colours = [str(c) for c in rng.choice(list(config.colours), size=len(cast), replace=False)]
  radii = np.array([SPECIES[s].radius for s in cast])  # [K]

  # Its own stream: a painted video keeps the characters and actions of the unpainted one.
  paint = ([str(p) for p in np.random.default_rng([config.seed, index, 1]).choice(
      list(config.paints), size=2, replace=False)] if config.paints else None)

  lengths = _scene_lengths(rng, config.num_segments)
  scenes = tuple(s for s, n in enumerate(lengths) for _ in range(n))
  backgrounds = [str(rng.choice(BACKGROUNDS))]
  for _ in lengths[1:]:
    backgrounds.append(str(rng.choice([b for b in BACKGROUNDS if b != backgrounds[-1]])))

  ranges = segment_frame_ranges(config.num_segments)
  xs, lifts, segments = [], [], []
  for i, (f0, f1) in enumerate(ranges):
    opens_scene = i == 0 or scenes[i] != scenes[i - 1]
    if opens_scene:
      x = _opening_positions(rng, radii, aspect)
    action, end = _sample_action(rng, x, radii, aspect)
    # Frames sit at progress j / 48; segment i > 0 starts one frame after its predecessor.
    u = (np.arange(f0, f1) - (f1 - SEGMENT_FRAMES - 1)) / SEGMENT_FRAMES  # [N]
    seg_x, seg_lift = _trajectory(action, x, end, radii, u)
    xs.append(seg_x)
    lifts.append(seg_lift)
    x = end
    segments.append({
        "scene": scenes[i], "background": backgrounds[scenes[i]], "action": action.kind,
        "actor": cast[action.actor],
        "target": None if action.target is None else cast[action.target],
        "direction": {-1: "left", 0: None, 1: "right"}[action.direction],
        "hops": action.hops or None, "frames": [f0, f1],
    })
  cx = np.concatenate(xs, axis=1)  # [K, T]
  cy = _GROUND - radii[:, None] - np.concatenate(lifts, axis=1)  # [K, T]

  # Rasterise segment by segment to bound memory at large resolutions.
  grid_y, grid_x = _grid(h, w)
  draw_order = np.argsort(-radii, kind="stable")  # big first, so small ones stay visible
  rgb = np.array([PALETTE[c] for c in colours], np.uint8)  # [K, 3]
  frames = np.empty((config.num_frames, h, w, 3), np.uint8)  # [T, H, W, 3]
  backdrops = {name: render_background(name, h, w, paint and tuple(paint))
               for name in set(backgrounds)}
  for i, (f0, f1) in enumerate(ranges):
    chunk = frames[f0:f1]  # [N, H, W, 3] view
    chunk[:] = backdrops[backgrounds[scenes[i]]]
    for k in draw_order:
      chunk[_shape_masks(SPECIES[cast[k]].shape, cy[k, f0:f1], cx[k, f0:f1], radii[k],
                         grid_y, grid_x)] = rgb[k]

  attributes = {
      "seed": config.seed, "index": index, "seconds": config.seconds, "fps": FPS,
      "height": h, "width": w,
      "characters": [{
          "species": s, "colour": c, "rgb": list(PALETTE[c]), "shape": SPECIES[s].shape,
          "radius": float(radii[k] * h),
          "positions": (np.stack([cy[k], cx[k]], axis=-1) * h).tolist(),  # [T][y, x] px
      } for k, (s, c) in enumerate(zip(cast, colours))],
      "segments": segments,
      "paint": paint and {"wall": paint[0], "floor": paint[1]},
      "restate_paint": config.restate_paint,
  }
  return ToyVideo(frames, _storyboard(attributes, scenes), scenes, attributes)


def with_named_colours(video: ToyVideo, colours: Sequence[str] | None = None,
                       paint: Sequence[str] | None = None) -> ToyVideo:
  """The same frames under a storyboard naming other colours: `colours` for the characters
  (one per character, in the order of attributes["characters"]) and `paint` (wall, floor)
  for the house, wherever the storyboard names them; None keeps what was drawn. A
  counterfactual storyboard, to measure how much a model's segments depend on what the
  captions said."""
  attributes = dict(video.attributes)
  cast = [c["species"] for c in attributes["characters"]]
  if colours is not None:
    colours = [str(c) for c in colours]
    if len(colours) != len(cast) or any(c not in PALETTE for c in colours):
      raise ValueError(f"colours must name one colour of {tuple(PALETTE)} per character "
                       f"({len(cast)}: {cast}), got {colours}")
    attributes["characters"] = [dict(c, colour=n)
                                for c, n in zip(attributes["characters"], colours)]
  if paint is not None:
    paint = [str(p) for p in paint]
    if attributes["paint"] is None:
      raise ValueError("paint given for a video whose house is not painted")
    if len(paint) != 2 or any(p not in PAINTS for p in paint):
      raise ValueError(f"paint must name (wall, floor) of {tuple(PAINTS)}, got {paint}")
    attributes["paint"] = {"wall": paint[0], "floor": paint[1]}
  return dataclasses.replace(video, captions=_storyboard(attributes, video.scenes))


class ToyCartoonSource(grain.RandomAccessDataSource):
  """Grain random-access source: videos are generated on demand, nothing is stored."""

  def __init__(self, config: ToyCartoonConfig):
    self.config = config

  def __len__(self) -> int:
    return self.config.num_videos

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"video index {index} out of range for {len(self)} videos")
    video = generate_video(self.config, index)
    return {
        "frames": video.frames,  # [T, H, W, 3] uint8
        "captions": np.array(video.captions),  # [S] str
        "scenes": np.array(video.scenes, np.int32),  # [S]
        "index": np.int64(index),
    }

  def __repr__(self) -> str:
    return f"ToyCartoonSource({self.config!r})"


def write_storyboard(video: ToyVideo, path: str | os.PathLike) -> None:
  """Write the captions as JSONL, one {"scene": s, "caption": c} per segment (sampler input)."""
  with open(path, "w", encoding="utf-8") as f:
    for scene, caption in zip(video.scenes, video.captions):
      f.write(json.dumps({"scene": scene, "caption": caption}) + "\n")
