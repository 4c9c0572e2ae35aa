"""Data pipeline: video layout of a config, the prepared toy set, deterministic resumable batches."""

import itertools
import json

import numpy as np
import pytest

from tests.conftest import small_config
from ttt_jax.data import dataset, pipeline, toy_cartoons
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


def _toy(cfg, seconds, workdir):
  return pipeline.open_dataset(cfg.data, seconds, CODEC, _encoder(cfg), workdir)


def _by_index(source) -> dict[int, dict]:
  """Records are stored in key-hash order: index them by their toy video."""
  return {int(r["source"].decode().split("[")[1].rstrip("]")): r for r in source}


def test_toy_dataset_is_the_encoded_videos_built_once(tmp_path, monkeypatch):
  cfg = small_config()
  source = _toy(cfg, 3, tmp_path)
  assert len(source) == 4
  rows = _by_index(source)
  assert sorted(rows) == [0, 1, 2, 3]
  toy = toy_cartoons.ToyCartoonConfig(seconds=3, height=32, width=48, seed=0, num_videos=4)
  for i, row in rows.items():
    video = toy_cartoons.generate_video(toy, i)
    want = CODEC.encode(toy_cartoons.frames_to_float(video.frames)[None])[0]
    assert row["latents"].shape == (13, 32 // 8, 48 // 8, 16) and row["latents"].dtype == np.float32
    np.testing.assert_allclose(row["latents"], want, rtol=0, atol=1e-6)  # fp32, same jit
    assert row["text"].shape == (1 * 4, cfg.data.text_dim)
    assert [c.decode() for c in row["captions"]] == list(video.captions)
    np.testing.assert_array_equal(row["scenes"], video.scenes)
  folders = list((tmp_path / "data" / "storyboard").iterdir())
  assert [f.name for f in folders] == [pipeline.toy_config_name(cfg.data, 3)]

  def boom(*args, **kwargs):
    raise AssertionError("regenerated a prepared video")

  monkeypatch.setattr(toy_cartoons, "generate_video", boom)
  again = _by_index(_toy(cfg, 3, tmp_path))  # prepared once: never regenerated
  for i in rows:
    np.testing.assert_array_equal(again[i]["latents"], rows[i]["latents"])


def test_toy_dataset_is_keyed_by_the_data_config(tmp_path):
  cfg = small_config()
  cfg.data.num_videos = 2
  first = _by_index(_toy(cfg, 3, tmp_path))
  cfg.data.seed = 1  # other videos: must not be served from the seed-0 set
  second = _by_index(_toy(cfg, 3, tmp_path))
  assert len(list((tmp_path / "data" / "storyboard").iterdir())) == 2
  assert not np.array_equal(first[0]["latents"], second[0]["latents"])


def test_multi_segment_text_is_segment_major(tmp_path):
  cfg = small_config(9)
  cfg.data.num_videos = 1
  [row] = _toy(cfg, 9, tmp_path)
  assert row["latents"].shape == (13 + 12 + 12, 4, 6, 16)
  assert row["text"].shape == (3 * 4, cfg.data.text_dim)
  np.testing.assert_array_equal(row["segments"], [0, 1, 2])
  for s, caption in enumerate(row["captions"]):
    one = pipeline.encode_captions([caption.decode()], _encoder(cfg), 4)
    np.testing.assert_array_equal(row["text"][4 * s:4 * (s + 1)], one)


def test_unknown_dataset_name(tmp_path):
  cfg = small_config()
  cfg.data.name = "tom_and_jerry_real"
  with pytest.raises(ValueError, match="unknown data.name 'tom_and_jerry_real'"):
    _toy(cfg, 3, tmp_path)


def test_storyboard_dataset_must_exist_and_match_the_config(tmp_path):
  cfg = small_config()
  cfg.data.name = "storyboard"
  with pytest.raises(ValueError, match="data.name='storyboard' needs data.dir"):
    _toy(cfg, 3, tmp_path)
  cfg.data.dir = str(tmp_path / "prepared")
  with pytest.raises(FileNotFoundError, match=r"no prepared dataset at .*storyboard/3s/1.0.0; "
                                              r"prepare it with python -m ttt_jax.data.prepare"):
    _toy(cfg, 3, tmp_path)
  spec = pipeline.clip_spec(cfg.data, 3, CODEC, _encoder(cfg))
  row = {"latents": np.zeros(spec.latent_shape, np.float32),
         "text": np.zeros((4, cfg.data.text_dim), np.float32), "captions": ["a cat"],
         "segments": np.zeros(1, np.int32), "scenes": np.zeros(1, np.int32), "source": "a.mp4"}
  dataset.write([("a", row)], cfg.data.dir, "3s", spec)
  assert len(_toy(cfg, 3, tmp_path)) == 1
  cfg.data.text_len = 8  # another config reading the same folder
  with pytest.raises(ValueError, match=r"prepared for another config: text_len=4 \(the config "
                                       r"needs 8\)"):
    _toy(cfg, 3, tmp_path)
  with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
    dataset.write([("a", row)], cfg.data.dir, "3s", spec)


def test_an_interrupted_write_leaves_nothing(tmp_path):
  cfg = small_config()
  spec = pipeline.clip_spec(cfg.data, 3, CODEC, _encoder(cfg))

  def examples():
    yield from itertools.islice(pipeline.toy_examples(cfg.data, 3, CODEC, _encoder(cfg)), 2)
    raise KeyboardInterrupt  # e.g. Ctrl-C mid-way

  with pytest.raises(KeyboardInterrupt):
    dataset.write(examples(), tmp_path, "3s", spec)
  assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------- batches
def _examples(n=10):
  """Rows tagged by index: latents[i] == i, text[i] == -i (and a field training ignores)."""
  return [{"latents": np.full((1, 1), i, np.float32), "text": np.full((1,), -i, np.float32),
           "source": f"v{i}"} for i in range(n)]


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


def test_batch_size_must_divide_over_data_shards():
  with pytest.raises(ValueError, match="not divisible by the 2 data shards"):
    pipeline.batches(_examples(), 3, seed=0, shard=(0, 2))


def test_each_data_shard_reads_its_own_examples():
  seen = {i: set(sum(_take(pipeline.batches(_examples(), 4, seed=0, shard=(i, 2)), 5), []))
          for i in (0, 1)}
  assert seen == {0: {0, 2, 4, 6, 8}, 1: {1, 3, 5, 7, 9}}  # disjoint, together everything
  with pytest.raises(ValueError, match="the dataset has 10 clips, fewer than the 16 data"):
    pipeline.batches(_examples(), 16, seed=0, shard=(0, 16))
