"""Storyboard + videos -> a prepared dataset of training clips (tfds, array_record).

    python -m ttt_jax.data.prepare --storyboard=story.jsonl --videos=DIR \
        --out=data/tom_jerry --config=configs/tom_jerry_9s.py

The storyboard has one JSON object per line, one source video each:

    {"video": "ep01.mp4", "start": 12.0, "end": 75.5,
     "scenes": [{"captions": ["<3 s segment 1>", "<segment 2>"]}, {"captions": ["..."]}]}

Every caption describes one 3 s segment (48 frames at 16 fps), in order;
scenes group consecutive segments. `start` / `end` (seconds, optional)
bound the captioned part of the file; by default it is the whole file, and
it must hold exactly as many whole segments as there are captions (plus the
layout's one leading frame). Each video is decoded with ffmpeg, resampled to
16 fps, scaled to cover the configured frame and centre-cropped, then cut
into clips of the config's length (`--seconds`, e.g. 3,9,18,30,63 for the
whole curriculum) on segment boundaries; a clip of n segments is 48 n + 1
frames, the first segment carrying the extra frame. Clips are encoded by
the config's VAE and text encoder in batches and written as
`<out>/storyboard/<seconds>s` (see `ttt_jax.data.dataset`), which training
reads with data.name="storyboard", data.dir=<out>.

Bad input gets one line naming the file (--on_error=skip: report and go on;
stop: exit non-zero with nothing written): an unreadable video, one below
16 fps or smaller than the frame (it would be upscaled), a clip shorter
than its captions need, and a caption count that does not match the
video's segments.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import warnings
from typing import Any, Iterator, Sequence

import imageio_ffmpeg
import numpy as np
import tqdm
from absl import app, flags, logging
from ml_collections import config_flags

from ttt_jax.data import dataset, pipeline
from ttt_jax.data.toy_cartoons import FPS, SEGMENT_FRAMES, frames_to_float
from ttt_jax.layout import SECONDS_PER_SEGMENT
from ttt_jax.models.text import TextEncoder
from ttt_jax.models.vae import LatentCodec


class BadInput(ValueError):
  """One storyboard line or video that cannot become training clips: "<file>: <why>"."""

  def __init__(self, file: str | pathlib.Path, why: str):
    super().__init__(f"{file}: {why}")
    self.file = str(file)


@dataclasses.dataclass(frozen=True)
class Entry:
  """One storyboard line: a video and the caption and scene of each of its 3 s segments."""
  video: pathlib.Path
  captions: tuple[str, ...]
  scenes: tuple[int, ...]
  start: float = 0.0
  end: float | None = None
  source: str = ""  # the storyboard's name for the video (relative to --videos)

  @property
  def frames_needed(self) -> int:
    return SEGMENT_FRAMES * len(self.captions) + 1


def read_storyboard(path: str | pathlib.Path, videos: str | pathlib.Path
                    ) -> list[Entry | BadInput]:
  """Every line of a storyboard JSONL, parsed into an Entry or the BadInput naming it."""
  path, out = pathlib.Path(path), []
  for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
    if not line.strip():
      continue
    where = f"{path}:{n}"
    try:
      raw = json.loads(line)
      video, scenes = raw["video"], raw["scenes"]
      captions = [c for scene in scenes for c in scene["captions"]]
      scene_ids = [i for i, scene in enumerate(scenes) for _ in scene["captions"]]
      start = float(raw.get("start", 0.0))
      end = None if raw.get("end") is None else float(raw["end"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
      out.append(BadInput(where, f"not a storyboard line ({type(e).__name__}: {e}); expected "
                          f'{{"video": FILE, "scenes": [{{"captions": [...]}}, ...]}}'))
      continue
    empty = [i for i, scene in enumerate(scenes) if not scene["captions"]]
    if not captions or empty or not all(isinstance(c, str) and c.strip() for c in captions):
      out.append(BadInput(where, f"({video}) caption count does not match the segments: every "
                          f"scene needs >= 1 caption and every caption text"
                          + (f" (scene(s) {empty} have none)" if empty else "")))
      continue
    if start < 0 or (end is not None and end <= start):
      out.append(BadInput(where, f"({video}) start={start}, end={end} is not an interval"))
      continue
    out.append(Entry(pathlib.Path(videos) / video, tuple(captions), tuple(scene_ids), start,
                     end, str(video)))
  return out


def _ffmpeg_filter(height: int, width: int) -> str:
  # 16 fps, then the smallest scale that covers height x width, then the centre crop.
  return (f"fps={FPS},scale={width}:{height}:force_original_aspect_ratio=increase,"
          f"crop={width}:{height}")


def _ffmpeg(video: pathlib.Path, **kwargs: Any) -> tuple[dict[str, Any], Iterator[bytes]]:
  """imageio-ffmpeg's (metadata, frame reader); raises BadInput if ffmpeg cannot open it."""
  try:
    with warnings.catch_warnings():  # JAX warns on fork; ffmpeg is exec'd at once, no deadlock
      warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called")
      reader = imageio_ffmpeg.read_frames(str(video), **kwargs)
      return next(reader), reader
  except (OSError, RuntimeError, StopIteration) as e:
    raise _unreadable(video, e) from None


def _unreadable(video: pathlib.Path, error: Exception) -> BadInput:
  text = str(error).strip()  # ffmpeg's stderr follows its first line
  return BadInput(video, f"unreadable video ({text.splitlines()[0] if text else type(error).__name__})")


def probe(entry: Entry, height: int, width: int) -> None:
  """Cheap checks from the container's metadata; raises BadInput naming the file."""
  meta, reader = _ffmpeg(entry.video)
  reader.close()
  fps, (src_w, src_h) = meta["fps"], meta["source_size"]
  if fps < FPS:
    raise BadInput(entry.video, f"{fps:g} fps is below the {FPS} fps training rate "
                   f"(frames would have to be invented)")
  if src_h < height or src_w < width:
    raise BadInput(entry.video, f"{src_w}x{src_h} is smaller than the configured "
                   f"{width}x{height} frame (it would be upscaled); lower data.height/width")
  end = meta["duration"] if entry.end is None else min(entry.end, meta["duration"])
  need = entry.frames_needed / FPS
  if end - entry.start < need - 1.0 / FPS:  # one frame of slack: durations are rounded
    raise BadInput(entry.video, f"clip shorter than its captions need: {len(entry.captions)} "
                   f"captions need {need:.2f} s from start={entry.start:g} s, the clip is "
                   f"{end - entry.start:.2f} s")


def decode(entry: Entry, height: int, width: int) -> np.ndarray:
  """The captioned frames, uint8 [48 S + 1, height, width, 3] at 16 fps; raises BadInput."""
  skip = round(entry.start * FPS)
  stop = None if entry.end is None else round(entry.end * FPS) + 1  # + the closing frame
  # One more whole segment than the captions cover proves an uncaptioned segment.
  limit = skip + entry.frames_needed + SEGMENT_FRAMES
  if stop is not None:
    limit = min(limit, stop)
  size = height * width * 3
  frames = []
  _, reader = _ffmpeg(entry.video, output_params=["-vf", _ffmpeg_filter(height, width)])
  try:
    for i, raw in enumerate(reader):
      if i >= limit:
        break
      if i >= skip:
        if len(raw) != size:
          raise BadInput(entry.video, f"ffmpeg gave a {len(raw)}-byte frame, expected "
                         f"{width}x{height}x3")
        frames.append(np.frombuffer(raw, np.uint8).reshape(height, width, 3))
    reader.close()
  except (OSError, RuntimeError) as e:
    raise _unreadable(entry.video, e) from None
  got, need, n = len(frames), entry.frames_needed, len(entry.captions)
  if got < need:
    raise BadInput(entry.video, f"clip shorter than its captions need: {n} captions need "
                   f"{need} frames at {FPS} fps ({need / FPS:.2f} s) from start={entry.start:g} s, "
                   f"the video has {got}")
  if got >= need + SEGMENT_FRAMES:
    whole = (got - 1) // SEGMENT_FRAMES
    raise BadInput(entry.video, f"caption count does not match the segments: {n} captions, "
                   f"but the video has at least {whole} whole {SECONDS_PER_SEGMENT} s segments "
                   f"from start={entry.start:g} s; give one caption per segment, or an \"end\"")
  return np.stack(frames[:need])


def clips(entry: Entry, frames: np.ndarray, seconds: int, stride: int | None = None
          ) -> Iterator[dict[str, Any]]:
  """Clips of `seconds` on segment boundaries, every `stride` segments (default: abutting)."""
  n = seconds // SECONDS_PER_SEGMENT
  for s0 in range(0, len(entry.captions) - n + 1, stride or n):
    yield {
        "frames": frames[SEGMENT_FRAMES * s0:SEGMENT_FRAMES * (s0 + n) + 1],  # [48 n + 1, H, W, 3]
        "captions": list(entry.captions[s0:s0 + n]),
        "segments": np.arange(s0, s0 + n, dtype=np.int32),
        "scenes": np.asarray(entry.scenes[s0:s0 + n], np.int32),
        "source": entry.source,
        # Unique even for two ranges (start / end) of one file.
        "key": f"{entry.source}@{entry.start:g}s:{s0}",
    }


class Report:
  """Bad inputs, one line each: logged and kept (skip), or raised (stop)."""

  def __init__(self, on_error: str):
    if on_error not in ("skip", "stop"):
      raise ValueError(f"--on_error={on_error!r}: choose 'skip' or 'stop'")
    self.on_error, self.bad, self.files = on_error, [], set()

  def __call__(self, error: BadInput) -> None:
    if self.on_error == "stop":
      raise error
    logging.warning("skipped: %s", error)
    self.bad.append(str(error))
    self.files.add(error.file)


def encoded_examples(entries: Sequence[Entry], spec: dataset.ClipSpec, codec: LatentCodec,
                     text_encoder: TextEncoder, report: Report, *, batch_size: int = 1,
                     stride: int | None = None, counts: dict[str, int] | None = None
                     ) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, example) of every clip, encoded `batch_size` clips at a time."""
  counts = {} if counts is None else counts
  pending: list[dict[str, Any]] = []

  def flush() -> Iterator[tuple[str, dict[str, Any]]]:
    video = np.stack([frames_to_float(c.pop("frames")) for c in pending])  # [B, T, H, W, 3]
    latents = np.asarray(codec.encode(video), np.float32)  # codecs jit their own steps
    captions = [caption for c in pending for caption in c["captions"]]
    text = pipeline.encode_captions(captions, text_encoder, spec.text_len)
    text = text.reshape(len(pending), -1, text.shape[-1]).astype(np.float32)
    for clip, z, t in zip(pending, latents, text):
      counts["clips"] = counts.get("clips", 0) + 1
      yield clip.pop("key"), {**clip, "latents": z, "text": t}
    pending.clear()

  for entry in tqdm.tqdm(entries, desc=f"{spec.seconds} s clips", unit="video"):
    try:
      frames = decode(entry, spec.height, spec.width)
    except BadInput as e:
      report(e)
      continue
    made = 0
    for clip in clips(entry, frames, spec.seconds, stride):
      pending.append(clip)
      made += 1
      if len(pending) == batch_size:
        yield from flush()
    if not made:
      counts["too_short"] = counts.get("too_short", 0) + 1
      logging.info("%s: %d segments, shorter than one %d s clip", entry.video,
                   len(entry.captions), spec.seconds)
  if pending:
    yield from flush()


def prepare(config: Any, storyboard: str | pathlib.Path, videos: str | pathlib.Path,
            out: str | pathlib.Path, *, seconds: Sequence[int] | None = None,
            on_error: str = "skip", overwrite: bool = False, batch_size: int = 1,
            stride: int | None = None) -> dict[str, Any]:
  """Writes <out>/storyboard/<s>s for every clip length s; returns a summary.

  Raises BadInput (on_error='stop') before anything is written for a bad
  storyboard line or video header, or, for a bad frame count, with the
  partial dataset removed.
  """
  report = Report(on_error)
  height, width = config.data.height, config.data.width
  entries = []
  for item in read_storyboard(storyboard, videos):
    try:
      if isinstance(item, BadInput):
        raise item
      probe(item, height, width)
      entries.append(item)
    except BadInput as e:
      report(e)
  codec, text_encoder = pipeline.make_encoders(config.data)
  summary: dict[str, Any] = {"videos": len(entries), "datasets": {}}
  for s in seconds or [config.seconds]:
    if s < SECONDS_PER_SEGMENT or s % SECONDS_PER_SEGMENT:
      raise ValueError(f"--seconds={s}: clips are whole {SECONDS_PER_SEGMENT} s segments")
    spec = pipeline.clip_spec(config.data, s, codec, text_encoder)
    counts: dict[str, int] = {}
    examples = encoded_examples(entries, spec, codec, text_encoder, report,
                                batch_size=batch_size, stride=stride, counts=counts)
    folder, count = dataset.write(examples, out, f"{s}s", spec, overwrite=overwrite,
                                  description=f"{s} s clips of {storyboard}")
    entries = [e for e in entries if str(e.video) not in report.files]  # decode failed once
    summary["datasets"][f"{s}s"] = {"folder": str(folder), "clips": count,
                                     "videos_too_short": counts.get("too_short", 0)}
  summary["skipped"] = report.bad
  return summary


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  config = FLAGS.config
  out = FLAGS.out or config.data.dir
  if not out:
    raise app.UsageError("--out (or the config's data.dir) is required")
  try:
    summary = prepare(config, FLAGS.storyboard, FLAGS.videos, out,
                      seconds=[int(s) for s in FLAGS.seconds] if FLAGS.seconds else None,
                      on_error=FLAGS.on_error, overwrite=FLAGS.overwrite,
                      batch_size=FLAGS.batch_size, stride=FLAGS.stride)
  except (BadInput, FileExistsError) as e:
    sys.exit(f"prepare stopped, nothing written: {e}")
  print(json.dumps(summary))


FLAGS = flags.FLAGS

if __name__ == "__main__":
  config_flags.DEFINE_config_file("config", None, "Stage config file[:preset] (resolution, "
                                  "encoders, clip length).", lock_config=True)
  flags.DEFINE_string("storyboard", None, "Storyboard JSONL, one line per video.")
  flags.DEFINE_string("videos", ".", "Folder the storyboard's video paths are relative to.")
  flags.DEFINE_string("out", None, "Dataset folder (default: the config's data.dir).")
  flags.DEFINE_list("seconds", None, "Clip lengths to write (default: the config's seconds).")
  flags.DEFINE_enum("on_error", "skip", ["skip", "stop"], "A bad video: skip it or stop.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing dataset of the same clip length.")
  flags.DEFINE_integer("batch_size", 1, "Clips per VAE / text encoder call.")
  flags.DEFINE_integer("stride", None, "Segments between clip starts (default: the clip's "
                       "own length, abutting clips).")
  flags.mark_flags_as_required(["config", "storyboard"])
  app.run(main)
