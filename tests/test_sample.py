"""Sampling: storyboards, videos from a trained workdir, mp4/gif output, the CLI."""

import json
import pathlib
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest

from tests.conftest import small_config
from ttt_jax import sample, train

REPO = pathlib.Path(__file__).resolve().parents[1]
CAPTIONS = ["A grey cat chases a brown mouse in the kitchen.",
            "The mouse hops twice over the cat.",
            "In the garden, the dog runs to the right."]


# -------------------------------------------------------------- storyboards
def test_load_storyboard_txt(tmp_path):
  path = tmp_path / "story.txt"
  path.write_text(f"{CAPTIONS[0]}\n\n   \n  {CAPTIONS[1]}  \n{CAPTIONS[2]}")
  assert sample.load_storyboard(path) == CAPTIONS


def test_load_storyboard_jsonl(tmp_path):
  path = tmp_path / "story.jsonl"
  lines = [json.dumps({"scene": s, "caption": c}) for s, c in zip((0, 0, 1), CAPTIONS)]
  path.write_text("\n".join([lines[0], "", lines[1], "  ", lines[2], ""]))
  assert sample.load_storyboard(path) == CAPTIONS


def test_load_storyboard_in_prepares_format(tmp_path):
  """A line of the storyboard ttt_jax.data.prepare reads samples its captions in order."""
  path = tmp_path / "story.jsonl"
  path.write_text(json.dumps({"video": "ep.mp4", "scenes": [{"captions": CAPTIONS[:2]},
                                                            {"captions": CAPTIONS[2:]}]}) + "\n")
  assert sample.load_storyboard(path) == CAPTIONS


@pytest.mark.parametrize("bad", ['{"scene": 0, "caption": ', '{"scene": 1}', '["a caption"]',
                                 '"a caption"', "7"])
def test_load_storyboard_bad_jsonl_names_file_and_line(tmp_path, bad):
  path = tmp_path / "story.jsonl"
  path.write_text(json.dumps({"caption": CAPTIONS[0]}) + "\n\n" + bad + "\n")
  with pytest.raises(ValueError, match=rf"{path}:3: expected a JSON object"):
    sample.load_storyboard(path)


@pytest.mark.parametrize("name, text", [("story.txt", ""), ("story.txt", "\n  \n\n"),
                                        ("story.jsonl", "\n\n")])
def test_load_storyboard_empty(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ValueError, match=rf"{path}: storyboard has no captions"):
    sample.load_storyboard(path)


# ------------------------------------------------------------------ videos
def test_write_video_mp4_and_gif(tmp_path):
  t, h, w = 12, 32, 48
  ramp = np.linspace(0, 1, w)[None, None, :, None] * np.linspace(0.5, 1, h)[None, :, None, None]
  frames = (np.arange(t)[:, None, None, None] * 15 + 60 * ramp * np.array([1, 2, 3])).astype(np.uint8)
  paths = sample.write_video(frames, tmp_path / "new" / "clip", fps=16)
  assert paths == [tmp_path / "new" / "clip.mp4", tmp_path / "new" / "clip.gif"]

  mp4 = iio.imread(paths[0])
  assert mp4.shape == (t, h, w, 3) and mp4.dtype == np.uint8
  assert iio.immeta(paths[0])["fps"] == 16
  # H.264 is lossy and yuv420p halves chroma resolution; on smooth frames that is a few levels.
  assert np.abs(mp4.astype(int) - frames).mean() < 4
  gif = iio.imread(paths[1])
  assert gif.shape[:3] == (t, h, w)
  np.testing.assert_array_equal(gif[..., :3], frames)  # few colours: GIF's palette is exact


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A workdir of a 2-step run of the small config (config.json + checkpoints/2)."""
  path = tmp_path_factory.mktemp("run")
  train.train(small_config(steps=2, log_every=1, ckpt_every=2), path)
  return path


def test_sample_video_shapes_and_determinism(workdir):
  one = sample.sample_video(workdir, CAPTIONS[:1], steps=3, seed=1, progress=False)
  assert one.shape == (49, 32, 48, 3) and one.dtype == np.uint8
  np.testing.assert_array_equal(
      sample.sample_video(workdir, CAPTIONS[:1], steps=3, seed=1, progress=False), one)
  other = sample.sample_video(workdir, CAPTIONS[:1], steps=3, seed=2, progress=False)
  assert other.shape == one.shape and not np.array_equal(other, one)


def test_a_loaded_sampler_is_reused_with_the_same_results(workdir):
  """One Sampler samples several storyboards (weights loaded once, the denoiser compiled
  once per length) and gives what sample_video gives."""
  sampler = sample.Sampler(workdir, 1)
  first = sampler(CAPTIONS[:1], steps=3, seed=1, progress=False)
  np.testing.assert_array_equal(
      first, sample.sample_video(workdir, CAPTIONS[:1], steps=3, seed=1, progress=False))
  assert sampler(CAPTIONS[1:2], steps=3, seed=1, progress=False).shape == first.shape
  assert len(sampler._denoisers) == 1
  with pytest.raises(ValueError, match="unknown sampler 'euler'"):
    sampler(CAPTIONS[:1], sampler="euler")


def test_sample_multi_scene_video(workdir):
  video = sample.sample_video(workdir, CAPTIONS, steps=3, sampler="ddim", progress=False)
  assert video.shape == (3 * 48 + 1, 32, 48, 3) and video.dtype == np.uint8
  assert video.std() > 0


def test_sample_video_errors(workdir, tmp_path):
  with pytest.raises(ValueError, match="unknown sampler 'euler'"):
    sample.sample_video(workdir, CAPTIONS[:1], steps=2, sampler="euler", progress=False)
  with pytest.raises(FileNotFoundError, match="is .* a training workdir"):
    sample.sample_video(tmp_path, CAPTIONS[:1], steps=2, progress=False)


def test_sample_cli(workdir, tmp_path):
  story = tmp_path / "story.txt"
  story.write_text(CAPTIONS[0] + "\n")
  proc = subprocess.run(
      [sys.executable, "-m", "ttt_jax.sample", f"--workdir={workdir}", f"--storyboard={story}",
       "--steps=2"], cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = workdir / "samples" / "story"
  assert proc.stdout.split() == [f"{out}.mp4", f"{out}.gif"]
  assert iio.imread(f"{out}.mp4").shape == (49, 32, 48, 3)
  assert iio.imread(f"{out}.gif").shape[:3] == (49, 32, 48)
