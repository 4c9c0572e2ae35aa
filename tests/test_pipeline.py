"""Data pipeline: video layout of a config, cached examples, deterministic resumable batches."""

import json

import numpy as np
import pytest

from configs import common
from tests.conftest import small_config
from ttt_jax.data import pipeline, toy_cartoons
from ttt_jax.models.text import make_text_encoder
from ttt_jax.models.vae import make_codec

CODEC = make_codec("toy")


def _encoder(cfg):
  return make_text_encoder(cfg.data.text_encoder, dim=cfg.data.text_dim)


@pytest.mark.parametrize("seconds, frames", [(3, (13,)), (9, (13, 12, 12))])
def test_video_layout_sizes(seconds, frames):
  cfg = small_config(seconds)
  layout = pipeline.video_layout(cfg.data, seconds, CODEC, patch_size=2)
  assert (layout.height, layout.width) == (32 // 16, 48 // 16)
  assert layout.segment_frames == frames
  assert layout.text_lens == (4,) * (seconds // 3)
  assert layout.seq_len == 4 * len(frames) + sum(frames) * 2 * 3


@pytest.mark.parametrize("height, width", [(40, 48), (32, 56), (8, 48)])
def test_video_layout_rejects_sizes_off_the_token_grid(height, width):
  cfg = small_config()
  cfg.data.height, cfg.data.width = height, width
  with pytest.raises(ValueError, match=rf"{height}x{width} must be multiples of 16"):
    pipeline.video_layout(cfg.data, 3, CODEC, patch_size=2)


def test_build_examples_shapes_and_cache(tmp_path, monkeypatch):
  cfg = small_config()
  cache_dir = tmp_path / "cache"
  examples = pipeline.build_examples(cfg.data, 3, CODEC, _encoder(cfg), cache_dir=cache_dir)
  assert examples["latents"].shape == (4, 13, 32 // 8, 48 // 8, 16)
  assert examples["text"].shape == (4, 1 * 4, cfg.data.text_dim)
  assert examples["latents"].dtype == examples["text"].dtype == np.float32
  assert len({examples["latents"][i].tobytes() for i in range(4)}) == 4  # four distinct videos
  files = sorted(cache_dir.iterdir())
  assert [f.suffix for f in files] == [".npz"] and "_p0of1" in files[0].name

  def boom(*args, **kwargs):
    raise AssertionError("regenerated a cached video")

  monkeypatch.setattr(toy_cartoons, "generate_video", boom)
  with pytest.raises(AssertionError, match="regenerated"):  # the patch is live...
    pipeline.build_examples(cfg.data, 3, CODEC, _encoder(cfg), cache_dir=None)
  again = pipeline.build_examples(cfg.data, 3, CODEC, _encoder(cfg), cache_dir=cache_dir)
  for key in examples:  # ...and the cache hit never reaches it
    np.testing.assert_array_equal(again[key], examples[key])
  assert sorted(cache_dir.iterdir()) == files


def test_cache_is_keyed_by_the_data_config(tmp_path):
  cfg = small_config()
  cfg.data.num_videos = 2
  first = pipeline.build_examples(cfg.data, 3, CODEC, _encoder(cfg), cache_dir=tmp_path)
  cfg.data.seed = 1  # other videos: must not be served from the seed-0 cache
  second = pipeline.build_examples(cfg.data, 3, CODEC, _encoder(cfg), cache_dir=tmp_path)
  assert len(list(tmp_path.glob("*.npz"))) == 2
  assert not np.array_equal(first["latents"], second["latents"])


def test_multi_segment_text_is_segment_major():
  cfg = small_config(9)
  cfg.data.num_videos = 1
  examples = pipeline.build_examples(cfg.data, 9, CODEC, _encoder(cfg))
  assert examples["latents"].shape == (1, 13 + 12 + 12, 4, 6, 16)
  assert examples["text"].shape == (1, 3 * 4, cfg.data.text_dim)
  captions = list(toy_cartoons.generate_video(toy_cartoons.ToyCartoonConfig(
      seconds=9, height=32, width=48, seed=0, num_videos=1), 0).captions)
  for s, caption in enumerate(captions):
    one = pipeline.encode_captions([caption], _encoder(cfg), 4)
    np.testing.assert_array_equal(examples["text"][0, 4 * s:4 * (s + 1)], one)


def test_unknown_dataset_name():
  cfg = small_config()
  cfg.data.name = "tom_and_jerry_real"
  with pytest.raises(ValueError, match="unknown data.name 'tom_and_jerry_real'"):
    pipeline.build_examples(cfg.data, 3, CODEC, _encoder(cfg))


# ----------------------------------------------------------------- batches
def _examples(n=10):
  """Rows tagged by index: latents[i] == i, text[i] == -i."""
  return {"latents": np.arange(n, dtype=np.float32).reshape(n, 1, 1),
          "text": -np.arange(n, dtype=np.float32).reshape(n, 1)}


def _take(it, n):
  return [next(it)["latents"][:, 0, 0].astype(int).tolist() for _ in range(n)]


def test_batches_are_deterministic_epochs():
  ex = _examples()
  a = _take(pipeline.batches(ex, 2, seed=0), 15)
  assert a == _take(pipeline.batches(ex, 2, seed=0), 15)
  assert a != _take(pipeline.batches(ex, 2, seed=1), 15)
  for epoch in range(3):  # each epoch of 5 batches is a permutation of the 10 examples
    assert sorted(sum(a[5 * epoch:5 * (epoch + 1)], [])) == list(range(10))
  batch = next(pipeline.batches(ex, 4, seed=0))
  assert batch["latents"].shape == (4, 1, 1) and batch["text"].shape == (4, 1)
  np.testing.assert_array_equal(batch["text"][:, 0], -batch["latents"][:, 0, 0])  # rows stay whole


def test_batches_resume_from_state():
  ex = _examples()
  it = pipeline.batches(ex, 2, seed=7)
  _take(it, 3)
  state = json.loads(json.dumps(it.get_state()))  # what the checkpoint's JSON item stores
  want = _take(it, 8)
  resumed = pipeline.batches(ex, 2, seed=7)
  resumed.set_state(state)
  assert _take(resumed, 8) == want


def test_batch_size_must_divide_over_processes(monkeypatch):
  monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="not divisible by the 2 JAX processes"):
    pipeline.batches(_examples(), 3, seed=0)


def test_paper_size_toy_cache_is_capped_with_a_message(caplog):
  """The in-memory toy cache is encoded before step 1: at paper size it is capped."""
  data = common.get_config(63, "paper").data.to_dict()
  codec = make_codec("toy")
  with caplog.at_level("WARNING"):
    n = pipeline.cache_limit(data, 63, codec, data["text_dim"], data["num_videos"])
  per_video = 4 * (253 * 60 * 90 * 16 + 21 * 458 * 4096)  # latents + captions, fp32
  assert n == int(8e9 // per_video) < data["num_videos"]
  assert "10000 toy videos of 63 s at 480x720" in caplog.text and "caching the first" in caplog.text
  tiny = common.get_config(63, "tiny").data.to_dict()
  assert pipeline.cache_limit(tiny, 63, codec, tiny["text_dim"], tiny["num_videos"]) == 8
