"""prepare: storyboard + mp4 files -> tfds clips that train reads; each bad input named once.

The videos are toy cartoons written to H.264 in the test (one at 24 fps, so
resampling to 16 fps is exercised), plus broken ones. Reference for the
clip cutting: the same file decoded independently (imageio-ffmpeg, no
filters) and cut by frame index, then encoded by the same codec.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from tests.conftest import small_config
from ttt_jax import train
from ttt_jax.data import pipeline, prepare, toy_cartoons

H, W = 32, 48
TOY = toy_cartoons.ToyCartoonConfig(seconds=9, height=H, width=W, seed=5, num_videos=3)
REPO = pathlib.Path(__file__).resolve().parents[2]


def write_mp4(path: pathlib.Path, frames: np.ndarray, fps: int) -> None:
  writer = imageio_ffmpeg.write_frames(str(path), (frames.shape[2], frames.shape[1]), fps=fps,
                                       codec="libx264", quality=10, macro_block_size=8)
  writer.send(None)
  for frame in frames:
    writer.send(np.ascontiguousarray(frame))
  writer.close()


def read_mp4(path: pathlib.Path) -> np.ndarray:
  reader = imageio_ffmpeg.read_frames(str(path))
  meta = next(reader)
  w, h = meta["size"]
  return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader])


def line(video: str, captions: list[str], scenes: list[int], **extra) -> str:
  grouped: dict[int, list[str]] = {}
  for caption, scene in zip(captions, scenes):
    grouped.setdefault(scene, []).append(caption)
  return json.dumps({"video": video, "scenes": [{"captions": c} for c in grouped.values()],
                     **extra})


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """Three 9 s toy cartoons as mp4 (v2 at 24 fps) and their storyboard."""
  root = tmp_path_factory.mktemp("videos")
  lines, toys = [], []
  for i in range(3):
    toy = toy_cartoons.generate_video(TOY, i)
    toys.append(toy)
    if i == 2:  # 24 fps: source frame j shows toy frame floor(2j / 3)
      write_mp4(root / "v2.mp4", toy.frames[(np.arange(int(len(toy.frames) * 1.5)) * 2) // 3], 24)
    else:
      write_mp4(root / f"v{i}.mp4", toy.frames, 16)
    lines.append(line(f"v{i}.mp4", list(toy.captions), list(toy.scenes)))
  return root, lines, toys


def storyboard(root: pathlib.Path, lines: list[str]) -> pathlib.Path:
  path = root / "story.jsonl"
  path.write_text("\n".join(lines) + "\n")
  return path


def test_clips_are_cut_on_segment_boundaries_and_encoded(good, tmp_path):
  root, lines, toys = good
  cfg = small_config(9)
  summary = prepare.prepare(cfg, storyboard(tmp_path, lines), root, tmp_path / "data",
                            seconds=[3, 9], batch_size=2)
  assert summary["skipped"] == [] and summary["videos"] == 3
  assert {k: v["clips"] for k, v in summary["datasets"].items()} == {"3s": 9, "9s": 3}
  codec, text_encoder = pipeline.make_encoders(cfg.data)
  data = {**cfg.data.to_dict(), "name": "storyboard", "dir": str(tmp_path / "data")}
  three = pipeline.open_dataset(data, 3, codec, text_encoder, tmp_path)
  rows = {(r["source"].decode(), int(r["segments"][0])): r for r in three}
  assert sorted(rows) == [(f"v{i}.mp4", s) for i in range(3) for s in range(3)]
  decoded = read_mp4(root / "v0.mp4")  # already 16 fps: cut by index
  assert len(decoded) == 145
  for s in range(3):
    row = rows[("v0.mp4", s)]
    clip = decoded[48 * s:48 * s + 49]  # the first segment carries the extra frame
    want = codec.encode(toy_cartoons.frames_to_float(clip)[None])[0]
    np.testing.assert_allclose(row["latents"], want, rtol=0, atol=1e-5)
    assert [c.decode() for c in row["captions"]] == [toys[0].captions[s]]
    assert int(row["scenes"][0]) == toys[0].scenes[s]
    np.testing.assert_array_equal(
        row["text"], pipeline.encode_captions([toys[0].captions[s]], text_encoder, 4))
  # The 24 fps file resamples to the same 16 fps frames, up to H.264 noise (uint8 units);
  # one frame of misalignment would move the characters and cost >> 10.
  resampled = pipeline.open_dataset(data, 9, codec, text_encoder, tmp_path)
  [v2] = [r for r in resampled if r["source"] == b"v2.mp4"]
  toy_latents = codec.encode(toy_cartoons.frames_to_float(toys[2].frames)[None])[0]
  err = np.abs(np.asarray(codec.decode(v2["latents"][None])[0])
               - np.asarray(codec.decode(toy_latents[None])[0])).mean() * 127.5
  assert err < 4.0, err
  np.testing.assert_array_equal(v2["segments"], [0, 1, 2])


def test_train_streams_the_prepared_dataset(good, tmp_path):
  root, lines, _ = good
  cfg = small_config(3, steps=2, log_every=1, ckpt_every=2)
  prepare.prepare(cfg, storyboard(tmp_path, lines), root, tmp_path / "data")
  cfg.data.name, cfg.data.dir = "storyboard", str(tmp_path / "data")
  out = train.train(cfg, tmp_path / "run")
  assert np.isfinite(out["last_loss"])
  assert not (tmp_path / "run" / "data").exists()  # nothing re-encoded into the workdir


def bad_inputs(root: pathlib.Path, good_lines: list[str]) -> tuple[list[str], dict[str, str]]:
  """A storyboard mixing the good videos with one of each bad kind -> (lines, file -> reason)."""
  toy = toy_cartoons.generate_video(TOY, 0)
  (root / "garbage.mp4").write_bytes(b"not a video at all")
  write_mp4(root / "slow.mp4", toy.frames[::2], 8)
  write_mp4(root / "small.mp4", toy.frames[:, :16, :32], 16)
  write_mp4(root / "short.mp4", toy.frames[:97], 16)  # 2 segments, 3 captions
  write_mp4(root / "long.mp4", toy.frames, 16)  # 3 segments, 2 captions
  caps, scenes = list(toy.captions), list(toy.scenes)
  lines = good_lines + [
      line("garbage.mp4", caps, scenes), line("slow.mp4", caps, scenes),
      line("small.mp4", caps, scenes), line("short.mp4", caps, scenes),
      line("long.mp4", caps[:2], scenes[:2]), line("missing.mp4", caps, scenes),
      '{"video": "x.mp4", "captions": ["no scenes key"]}',
  ]
  reasons = {"garbage.mp4": "unreadable video", "slow.mp4": "8 fps is below the 16 fps",
             "small.mp4": "32x16 is smaller than the configured 48x32",
             "short.mp4": "clip shorter than its captions need: 3 captions need",
             "long.mp4": "caption count does not match the segments: 2 captions",
             "missing.mp4": "unreadable video",
             "story.jsonl:10": "not a storyboard line (KeyError"}
  return lines, reasons


def test_each_bad_input_is_one_line_naming_the_file_and_the_rest_is_kept(good, tmp_path):
  root, good_lines, _ = good
  lines, reasons = bad_inputs(root, good_lines)
  summary = prepare.prepare(small_config(9), storyboard(tmp_path, lines), root,
                            tmp_path / "data", seconds=[3, 9], on_error="skip")
  assert len(summary["skipped"]) == len(reasons), summary["skipped"]
  for message in summary["skipped"]:
    assert "\n" not in message
    [(name, reason)] = [(n, r) for n, r in reasons.items()
                        if message.split(": ")[0].endswith(n)]
    assert reason in message, (name, message)
  assert {k: v["clips"] for k, v in summary["datasets"].items()} == {"3s": 9, "9s": 3}


def test_stop_on_a_bad_video_leaves_nothing_written(good, tmp_path):
  root, good_lines, _ = good
  lines, _ = bad_inputs(root, good_lines)
  with pytest.raises(prepare.BadInput, match=r"garbage.mp4: unreadable video"):
    prepare.prepare(small_config(9), storyboard(tmp_path, lines), root, tmp_path / "data",
                    on_error="stop")
  assert not (tmp_path / "data").exists()  # refused from the headers, before any encoding
  # A frame-count problem shows only while decoding, i.e. mid-write: nothing is left either.
  long_only = good_lines + [lines[len(good_lines) + 4]]
  with pytest.raises(prepare.BadInput, match=r"long.mp4: caption count does not match"):
    prepare.prepare(small_config(3), storyboard(tmp_path, long_only), root, tmp_path / "data",
                    on_error="stop")
  assert list((tmp_path / "data").iterdir()) == []


def test_start_and_end_select_the_captioned_part(good, tmp_path):
  root, _, toys = good
  toy = toys[0]  # a 9 s file captioned from 3 s to its end: 2 segments
  entries = [prepare.read_storyboard(storyboard(tmp_path, [
      line("v0.mp4", list(toy.captions[1:]), list(toy.scenes[1:]), start=3.0)]), root)[0],
      prepare.read_storyboard(storyboard(tmp_path, [
          line("v0.mp4", list(toy.captions[:1]), list(toy.scenes[:1]), end=3.0)]), root)[0]]
  decoded = read_mp4(root / "v0.mp4")
  np.testing.assert_array_equal(prepare.decode(entries[0], H, W), decoded[48:])
  np.testing.assert_array_equal(prepare.decode(entries[1], H, W), decoded[:49])
  # Two ranges of one file in one storyboard: distinct clips, nothing overwritten.
  story = storyboard(tmp_path, [
      line("v0.mp4", list(toy.captions[:1]), list(toy.scenes[:1]), end=3.0),
      line("v0.mp4", list(toy.captions[1:]), list(toy.scenes[1:]), start=3.0)])
  summary = prepare.prepare(small_config(3), story, root, tmp_path / "data")
  assert summary["datasets"]["3s"]["clips"] == 3 and summary["skipped"] == []


def test_command_line(good, tmp_path):
  root, lines, _ = good
  lines, _ = bad_inputs(root, lines)
  base = [sys.executable, "-m", "ttt_jax.data.prepare", "--config=configs/tom_jerry_3s.py:tiny",
          "--config.data.height=32", "--config.data.width=48", "--config.data.text_len=4",
          f"--storyboard={storyboard(tmp_path, lines)}", f"--videos={root}",
          f"--out={tmp_path / 'data'}"]
  stop = subprocess.run(base + ["--on_error=stop"], cwd=REPO, capture_output=True, text=True)
  assert stop.returncode == 1
  assert stop.stderr.strip().splitlines()[-1] == (
      f"prepare stopped, nothing written: {root / 'garbage.mp4'}: unreadable video "
      "(Could not load meta information)")
  ok = subprocess.run(base, cwd=REPO, capture_output=True, text=True)
  assert ok.returncode == 0, ok.stderr[-2000:]
  summary = json.loads(ok.stdout)  # stdout is the summary alone; tfds' chatter goes to stderr
  assert summary["datasets"]["3s"]["clips"] == 9 and len(summary["skipped"]) == 7
  assert (tmp_path / "data" / "storyboard" / "3s" / "1.0.0" / "dataset_info.json").is_file()


def test_real_vae_path(good, tmp_path):
  """prepare through the CogVideoX VAE (a tiny random diffusers one): the stored latents are
  diffusers' posterior mean x scaling_factor of the decoded, [-1, 1]-scaled clip (1e-4)."""
  root, lines, _ = good
  torch.manual_seed(0)
  ref = AutoencoderKLCogVideoX(block_out_channels=(16, 16, 16, 16), latent_channels=16,
                               layers_per_block=1, norm_num_groups=4, scaling_factor=0.7).eval()
  ref.save_pretrained(tmp_path / "CogVideoX" / "vae", safe_serialization=True)
  cfg = small_config(3)
  cfg.data.codec, cfg.data.codec_path = "cogvideox", str(tmp_path / "CogVideoX")
  summary = prepare.prepare(cfg, storyboard(tmp_path, lines[:1]), root, tmp_path / "data",
                            batch_size=3)
  assert summary["datasets"]["3s"]["clips"] == 3
  codec, text_encoder = pipeline.make_encoders(cfg.data)
  data = {**cfg.data.to_dict(), "name": "storyboard", "dir": str(tmp_path / "data")}
  rows = {int(r["segments"][0]): r for r in pipeline.open_dataset(data, 3, codec, text_encoder,
                                                                  tmp_path)}
  clip = read_mp4(root / "v0.mp4")[48:97]  # segment 1
  x = torch.from_numpy(np.moveaxis(toy_cartoons.frames_to_float(clip), -1, 0)[None].copy())
  with torch.no_grad():
    want = np.moveaxis((ref.encode(x).latent_dist.mean * 0.7)[0].numpy(), 0, -1)  # [13, 4, 6, 16]
  assert rows[1]["latents"].shape == want.shape == (13, 4, 6, 16)
  err = np.abs(rows[1]["latents"] - want).max() / np.abs(want).max()
  assert err < 1e-4, err
