"""Toy cartoons: determinism, paper frame counts, storyboard/pixel ground truth, grain."""

import json
import re

import grain.python as grain
import numpy as np
import pytest

from ttt_jax.layout import VideoLayout
from ttt_jax.data.toy_cartoons import (ACTION_KINDS, FLOOR, PAINT_SHADE, PAINTS, PALETTE,
                                       ToyCartoonConfig, ToyCartoonSource, frames_to_float,
                                       generate_video, render_background,
                                       segment_frame_ranges, with_named_colours,
                                       write_storyboard)

_COLOUR_WORD = re.compile(r"\b(" + "|".join(PALETTE) + r")\b")


def _videos(seconds: int, count: int, seed: int = 0):
  config = ToyCartoonConfig(seconds=seconds, seed=seed)
  return [generate_video(config, i) for i in range(count)]


def _positions(video) -> np.ndarray:
  """[K, T, 2] recorded (y, x) centres in pixels."""
  return np.array([c["positions"] for c in video.attributes["characters"]])


def test_same_seed_and_index_is_bit_identical():
  config = ToyCartoonConfig(seconds=18, seed=7)
  a, b = generate_video(config, 5), generate_video(config, 5)
  np.testing.assert_array_equal(a.frames, b.frames)
  assert a.captions == b.captions and a.scenes == b.scenes
  assert json.dumps(a.attributes) == json.dumps(b.attributes)


def test_different_index_or_seed_differs():
  base = generate_video(ToyCartoonConfig(seconds=9, seed=7), 5)
  for other in (generate_video(ToyCartoonConfig(seconds=9, seed=7), 6),
                generate_video(ToyCartoonConfig(seconds=9, seed=8), 5)):
    assert not np.array_equal(base.frames, other.frames)
    assert base.attributes["characters"] != other.attributes["characters"]


@pytest.mark.parametrize("seconds,frames", [(3, 49), (9, 145), (18, 289), (30, 481), (63, 1009)])
def test_paper_frame_counts_and_structure(seconds, frames):
  video = generate_video(ToyCartoonConfig(seconds=seconds), 0)
  segments = seconds // 3
  assert video.frames.shape == (frames, 32, 48, 3) and video.frames.dtype == np.uint8
  assert len(video.captions) == len(video.scenes) == segments
  # 4x temporal VAE compression of these frames gives the layout's latent frames.
  layout = VideoLayout.from_seconds(seconds, text_len=1, height=1, width=1)
  assert (frames - 1) // 4 + 1 == layout.num_frames
  ranges = segment_frame_ranges(segments)
  assert ranges[0][0] == 0 and ranges[-1][1] == frames
  assert all(prev[1] == nxt[0] for prev, nxt in zip(ranges, ranges[1:]))
  assert [s["frames"] for s in video.attributes["segments"]] == [list(r) for r in ranges]
  # Scenes are numbered 0, 1, ... and span 1..3 consecutive segments.
  assert video.scenes[0] == 0 and np.all(np.diff(video.scenes) >= 0)
  assert np.all(np.diff(video.scenes) <= 1)
  assert np.bincount(video.scenes).max() <= 3
  assert _positions(video).shape == (len(video.attributes["characters"]), frames, 2)
  json.dumps(video.attributes)


def test_resolution_only_rescales_the_same_video():
  small = generate_video(ToyCartoonConfig(seconds=9), 3)
  large = generate_video(ToyCartoonConfig(seconds=9, height=64, width=96), 3)
  assert large.frames.shape == (145, 64, 96, 3)
  assert small.captions == large.captions
  np.testing.assert_allclose(2 * _positions(small), _positions(large), rtol=1e-12)


def test_colours_are_named_only_in_the_first_caption():
  for video in _videos(seconds=30, count=12):
    characters = video.attributes["characters"]
    first = video.captions[0]
    for c in characters:
      assert f"{c['colour']} {c['species']}" in first, (first, c["colour"])
    assert len(_COLOUR_WORD.findall(first)) == len(characters)
    for caption in video.captions[1:]:
      assert not _COLOUR_WORD.search(caption), caption
      for c in characters:
        assert c["colour"] not in caption


def test_first_caption_with_other_colours():
  """The counterfactual storyboard: the true colours give back the caption exactly; others
  change only the colour words, in the characters' order; bad colour lists are refused."""
  for video in _videos(seconds=9, count=12):
    truth = [c["colour"] for c in video.attributes["characters"]]
    assert with_named_colours(video, truth).captions == video.captions
    other = [c for c in PALETTE if c not in truth][:len(truth)]
    swapped = with_named_colours(video, other)
    assert swapped.captions[1:] == video.captions[1:] and swapped.frames is video.frames
    assert _COLOUR_WORD.findall(swapped.captions[0]) == other
    named = re.compile(r"\b[Aa]n? (" + "|".join(PALETTE) + r")\b")  # with its article
    assert named.sub("X", swapped.captions[0]) == named.sub("X", video.captions[0])
  with pytest.raises(ValueError, match="one colour of .* per character"):
    with_named_colours(video, truth[:-1])
  with pytest.raises(ValueError, match="got \\['teal'"):
    with_named_colours(video, ["teal", *truth[1:]])
  with pytest.raises(ValueError, match="house is not painted"):
    with_named_colours(video, paint=("teal", "pink"))


def _painted(seconds=9, count=8, restate=False, size=(64, 96)):
  cfg = ToyCartoonConfig(seconds=seconds, height=size[0], width=size[1], seed=4,
                         num_videos=count, paints=tuple(PAINTS), restate_paint=restate)
  return [generate_video(cfg, i) for i in range(count)]


def test_a_painted_house_keeps_the_story_and_names_its_paint_once():
  """Paint draws from its own stream: the same characters, actions and positions as the
  unpainted video; only the walls and floor change colour, to the two paints the first
  caption (and no other) names, in every scene."""
  plain = [generate_video(ToyCartoonConfig(seconds=9, height=64, width=96, seed=4), i)
           for i in range(8)]
  for video, unpainted in zip(_painted(), plain):
    paint = video.attributes["paint"]
    assert paint["wall"] != paint["floor"] and {paint["wall"], paint["floor"]} <= set(PAINTS)
    assert video.attributes["characters"] == unpainted.attributes["characters"]
    assert video.attributes["segments"] == unpainted.attributes["segments"]
    sentence = f"The walls are {paint['wall']} and the floor is {paint['floor']}. "
    assert video.captions[0] == sentence + unpainted.captions[0]
    assert video.captions[1:] == unpainted.captions[1:]
    # Every frame: the top row is wall (the paint, or a feature: window, sun, moon, stars),
    # the bottom row is floor (the paint or its shade, a road line); most pixels of each band
    # are the paint itself.
    H = video.frames.shape[1]
    bands = {"wall": slice(0, int(FLOOR * H)), "floor": slice(int(FLOOR * H) + 1, H)}
    for name, rows in bands.items():
      rgb = np.array(PAINTS[paint[name]])
      shade = np.round(rgb * PAINT_SHADE)
      band = video.frames[:, rows]
      share = ((band == rgb) | (band == shade)).all(-1).mean()
      assert share > 0.45, (name, share)


def test_the_oracle_storyboard_restates_the_paint_and_swaps_change_every_caption():
  for video, oracle in zip(_painted(count=4), _painted(count=4, restate=True)):
    np.testing.assert_array_equal(video.frames, oracle.frames)
    paint = video.attributes["paint"]
    sentence = f"The walls are {paint['wall']} and the floor is {paint['floor']}. "
    assert oracle.captions[0] == video.captions[0]
    for plain, restated in zip(video.captions[1:], oracle.captions[1:]):
      assert restated == sentence + plain
    other = [p for p in PAINTS if p not in paint.values()][:2]
    for v in (video, oracle):
      swapped = with_named_colours(v, paint=other)
      assert swapped.frames is v.frames and swapped.attributes is v.attributes
      assert swapped.captions == tuple(c.replace(f"are {paint['wall']} ", f"are {other[0]} ")
                                       .replace(f"is {paint['floor']}.", f"is {other[1]}.")
                                       for c in v.captions)
    assert with_named_colours(video, paint=(paint["wall"], paint["floor"])).captions == \
        video.captions
  with pytest.raises(ValueError, match="paint must name \\(wall, floor\\)"):
    with_named_colours(video, paint=("teal",))
  with pytest.raises(ValueError, match="ToyCartoonConfig.paints must be empty or name"):
    ToyCartoonConfig(paints=("teal", "orange"))
  with pytest.raises(ValueError, match="restate_paint needs paints"):
    ToyCartoonConfig(restate_paint=True)


def test_captions_follow_the_storyboard():
  for video in _videos(seconds=30, count=12):
    for i, (seg, caption) in enumerate(zip(video.attributes["segments"], video.captions)):
      opens_scene = i == 0 or video.scenes[i] != video.scenes[i - 1]
      assert (f"the {seg['background']}" in caption) == opens_scene, caption
      assert f"the {seg['actor']} " in caption.lower(), caption
      if seg["target"]:
        assert f"the {seg['target']}" in caption, caption
      if seg["action"] in ("run", "chase"):
        assert f"to the {seg['direction']}." in caption, caption


def test_generator_covers_every_action_and_an_optional_dog():
  videos = _videos(seconds=30, count=16)
  actions = {s["action"] for v in videos for s in v.attributes["segments"]}
  assert actions == set(ACTION_KINDS)
  casts = {len(v.attributes["characters"]) for v in videos}
  assert casts == {2, 3}


def test_attributes_match_pixels():
  for video in _videos(seconds=30, count=4):
    characters = video.attributes["characters"]
    pos = _positions(video)  # [K, T, 2]
    radius = np.array([c["radius"] for c in characters])  # [K]
    t_all = np.arange(video.frames.shape[0])
    # Every character's centre pixel shows its colour whenever no other
    # character's bounding box comes near enough to cover it.
    for k, c in enumerate(characters):
      gap = np.abs(pos[k][None] - np.delete(pos, k, axis=0)).max(-1)  # [K-1, T] Chebyshev
      clear = np.all(gap > np.delete(radius, k)[:, None] + 1.0, axis=0)  # [T]
      assert clear.mean() > 0.5
      rows, cols = np.floor(pos[k, clear]).astype(int).T
      np.testing.assert_array_equal(video.frames[t_all[clear], rows, cols],
                                    np.broadcast_to(c["rgb"], (clear.sum(), 3)))
    # Far from every character the frame is the segment's named backdrop.
    h, w = video.frames.shape[1:3]
    yy, xx = np.mgrid[:h, :w] + 0.5
    for seg in video.attributes["segments"]:
      f0, f1 = seg["frames"]
      backdrop = render_background(seg["background"], h, w)
      for t in (f0, f1 - 1):
        far = np.ones((h, w), bool)
        for k in range(len(characters)):
          far &= np.maximum(np.abs(yy - pos[k, t, 0]), np.abs(xx - pos[k, t, 1])) > radius[k] + 1
        np.testing.assert_array_equal(video.frames[t][far], backdrop[far])


def test_motion_is_smooth_inside_scenes_and_stays_in_frame():
  for video in _videos(seconds=63, count=4):
    pos = _positions(video)  # [K, T, 2]
    h, w = video.frames.shape[1:3]
    radius = np.array([c["radius"] for c in video.attributes["characters"]])[:, None]
    assert np.all(pos[..., 1] - radius >= 0) and np.all(pos[..., 1] + radius <= w)
    assert np.all(pos[..., 0] - radius >= 0) and np.all(pos[..., 0] + radius <= h)
    scene_of_frame = np.empty(video.frames.shape[0], int)
    for seg in video.attributes["segments"]:
      scene_of_frame[slice(*seg["frames"])] = seg["scene"]
    same_scene = scene_of_frame[1:] == scene_of_frame[:-1]  # [T-1]
    step = np.abs(np.diff(pos, axis=1)).max(axis=(0, 2))  # [T-1]
    assert step[same_scene].max() <= 0.1 * h
    assert step[same_scene].max() > 0  # something moves


def test_scene_cut_changes_background():
  cuts = 0
  for video in _videos(seconds=30, count=4):
    segs = video.attributes["segments"]
    changed = np.any(video.frames[1:] != video.frames[:-1], axis=-1).mean(axis=(1, 2))  # [T-1]
    for prev, seg in zip(segs, segs[1:]):
      f = seg["frames"][0]
      if seg["scene"] != prev["scene"]:
        cuts += 1
        assert seg["background"] != prev["background"]
        assert changed[f - 1] > 0.3
      else:
        assert changed[f - 1] < 0.1
  assert cuts > 0


def test_frames_to_float_range():
  frames = np.array([0, 128, 255], np.uint8)
  out = frames_to_float(frames)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, [-1.0, 0.5 / 127.5, 1.0], atol=1e-6)


def test_grain_shuffle_and_batch():
  source = ToyCartoonSource(ToyCartoonConfig(num_videos=8))
  assert len(source) == 8 and isinstance(source, grain.RandomAccessDataSource)
  dataset = grain.MapDataset.source(source).shuffle(seed=3).batch(4)
  batches = list(dataset)
  assert len(batches) == 2
  assert batches[0]["frames"].shape == (4, 49, 32, 48, 3)
  assert batches[0]["captions"].shape == (4, 1)
  order = np.concatenate([b["index"] for b in batches])
  assert sorted(order) == list(range(8)) and list(order) != list(range(8))
  record = source[int(order[0])]
  np.testing.assert_array_equal(batches[0]["frames"][0], record["frames"])
  assert batches[0]["captions"][0, 0] == record["captions"][0]


def test_grain_shards_are_disjoint_and_cover_everything():
  source = ToyCartoonSource(ToyCartoonConfig(num_videos=10))
  shards = []
  for shard_index in range(2):
    sampler = grain.IndexSampler(
        num_records=len(source), shuffle=True, seed=0, num_epochs=1,
        shard_options=grain.ShardOptions(shard_index=shard_index, shard_count=2))
    loader = grain.DataLoader(data_source=source, sampler=sampler, worker_count=0)
    shards.append({int(record["index"]) for record in loader})
  assert shards[0] and shards[1] and not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(range(10))


def test_source_rejects_out_of_range_index():
  source = ToyCartoonSource(ToyCartoonConfig(num_videos=2))
  with pytest.raises(IndexError):
    source[2]


def test_write_storyboard_round_trip(tmp_path):
  video = generate_video(ToyCartoonConfig(seconds=18), 1)
  path = tmp_path / "storyboard.jsonl"
  write_storyboard(video, path)
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert [line["scene"] for line in lines] == list(video.scenes)
  assert tuple(line["caption"] for line in lines) == video.captions


@pytest.mark.parametrize("kwargs,field", [
    (dict(height=40), "height"),
    (dict(width=50), "width"),
    (dict(height=32, width=32), "width"),
    (dict(seconds=4), "seconds"),
    (dict(seconds=0), "seconds"),
    (dict(num_videos=0), "num_videos"),
    (dict(seed=-1), "seed"),
])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ValueError, match=rf"ToyCartoonConfig\.{field}"):
    ToyCartoonConfig(**kwargs)
