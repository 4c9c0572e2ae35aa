"""The colour probes: exact on toy videos, robust to the codec, and they notice a character
that changes colour and a house repainted."""

import numpy as np
import pytest

from ttt_jax.data import toy_cartoons as tc
from ttt_jax.data import toy_probe as tp
from ttt_jax.models import vae

# Characters' colours the probe tells apart after the codec (grey, white, black and brown blend
# into each other and into the backdrops at character edges).
EVAL_COLOURS = ("orange", "blue", "red", "purple", "yellow")


def _videos(n, height=64, width=96, seconds=9, colours=EVAL_COLOURS, seed=7):
  cfg = tc.ToyCartoonConfig(seconds=seconds, height=height, width=width, seed=seed,
                            num_videos=n, colours=colours)
  return [tc.generate_video(cfg, i) for i in range(n)]


def test_f1_of_colour_sets():
  a, b = frozenset({"red", "blue"}), frozenset({"red", "yellow", "purple"})
  assert tp.f1(a, a) == 1.0 and tp.f1(frozenset(), frozenset()) == 1.0
  assert tp.f1(a, b) == pytest.approx(2 * 1 / 5)  # one hit, 2 + 3 colours
  assert tp.f1(frozenset(), b) == 0.0


def test_raw_ground_truth_reads_back_the_caption_colours_in_every_segment():
  """Full palette, no codec: every segment shows exactly the cast's colours."""
  for video in _videos(6, colours=tuple(tc.PALETTE)):
    present = tp.colours_per_segment(video.frames, len(video.captions))
    assert all(p == tp.caption_colours(video) for p in present), (present, video.captions[0])
    assert tp.consistency(present, tp.caption_colours(video)) == {
        "consistency": 1.0, "self_consistency": 1.0, "first_segment": 1.0}


def _through_codec(frames):
  codec = vae.ToyCodec()
  out = np.asarray(codec.decode(codec.encode(tc.frames_to_float(frames)[None])))[0]
  return np.round((np.clip(out, -1, 1) + 1) * 127.5).astype(np.uint8)


@pytest.mark.slow  # ~30 s: the codec on 145-frame videos
@pytest.mark.parametrize("size", [(64, 96), (96, 144)])
def test_through_the_codec_ground_truth_is_perfect_and_changes_are_caught(size):
  """decode(encode(video)) still reads as the caption's colours; a character recoloured after
  the first scene lowers the score, and the new colour is what appears."""
  rng = np.random.default_rng(0)
  config = tp.ProbeConfig(candidates=EVAL_COLOURS)
  for video in _videos(4, height=size[0], width=size[1], seed=11):
    wanted = tp.caption_colours(video)
    present = tp.colours_per_segment(_through_codec(video.frames), 3, config)
    assert tp.consistency(present, wanted)["consistency"] == 1.0, video.captions[0]
    k = int(rng.integers(len(video.attributes["characters"])))
    new = str(rng.choice([c for c in EVAL_COLOURS if c not in wanted]))
    changed = tp.colours_per_segment(_through_codec(tp.recolour(video, k, new)), 3, config)
    assert tp.consistency(changed, wanted)["consistency"] < 1.0
    assert new in changed[-1] and new not in changed[0]


def _painted(n, size, seconds=9, seed=3):
  cfg = tc.ToyCartoonConfig(seconds=seconds, height=size[0], width=size[1], seed=seed,
                            num_videos=n, colours=EVAL_COLOURS, paints=tuple(tc.PAINTS))
  return [tc.generate_video(cfg, i) for i in range(n)]


@pytest.mark.parametrize("size", [(32, 48), (64, 96)])
def test_the_paint_probe_is_exact_on_ground_truth_raw_and_through_the_codec(size):
  """Every segment's walls and floor read as the paint the first caption names, on 12
  storyboards (all 6 paints in both bands, every backdrop), before and after the codec; a
  house repainted from the third segment on reads as the new paint there and only there."""
  videos = _painted(12, size)
  assert {p for v in videos for p in tp.caption_paint(v)} == set(tc.PAINTS)
  for video in videos:
    truth = tp.caption_paint(video)
    for frames in (video.frames, _through_codec(video.frames)):
      assert tp.paints_per_segment(frames, 3) == [truth] * 3, video.captions[0]
    new = tuple(p for p in tc.PAINTS if p not in truth)[:2]
    read = tp.paints_per_segment(_through_codec(tp.repaint(video, new, 2)), 3)
    assert read == [truth, truth, new]
    assert tp.paint_agreement(read, truth, range(2)) == 1.0
    assert tp.paint_agreement(read, truth, [2]) == 0.0
    assert tp.paint_agreement(read, (truth[0], new[1]), [2]) == 0.5


def test_repaint_swapping_the_two_paints_repaints_each_pixel_once():
  video = _painted(1, (32, 48))[0]
  wall, floor = tp.caption_paint(video)
  read = tp.paints_per_segment(tp.repaint(video, (floor, wall), 1), 3)
  assert read == [(wall, floor), (floor, wall), (floor, wall)]


def test_an_unpainted_house_reads_no_paint():
  """Unpainted backdrops' walls and floors are no paint: a model that draws them scores 0."""
  video = _videos(1)[0]
  assert all(None in p for p in tp.paints_per_segment(video.frames, 3))
  with pytest.raises(ValueError, match="not painted"):
    tp.caption_paint(video)


def test_recolour_changes_only_that_character_from_the_second_scene():
  video = next(v for v in _videos(8, seconds=18) if len(set(v.scenes)) > 1)
  start = video.attributes["segments"][video.scenes.index(1)]["frames"][0]
  old = video.attributes["characters"][0]["rgb"]
  new = next(c for c in EVAL_COLOURS if c not in tp.caption_colours(video))
  frames = tp.recolour(video, 0, new)
  np.testing.assert_array_equal(frames[:start], video.frames[:start])
  assert not (frames[start:] == old).all(-1).any()
  changed = (frames != video.frames).any(-1)
  assert changed[start:].any() and (video.frames[changed] == old).all()


def test_errors_name_the_problem():
  video = _videos(1)[0]
  with pytest.raises(ValueError, match="145 frames; 2 segments need 97"):
    tp.colours_per_segment(video.frames, 2)
  with pytest.raises(ValueError, match="at least 2 segments"):
    tp.consistency([frozenset()], frozenset())
  with pytest.raises(ValueError, match="unknown colour 'green'"):
    tp.recolour(video, 0, "green")
  with pytest.raises(ValueError, match="ToyCartoonConfig.colours"):
    tc.ToyCartoonConfig(colours=("red", "blue"))


def test_colour_subset_is_respected_and_the_default_draws_are_unchanged():
  for video in _videos(6):
    assert tp.caption_colours(video) <= set(EVAL_COLOURS)
  default = tc.ToyCartoonConfig(seconds=3, seed=5, num_videos=2)
  explicit = tc.ToyCartoonConfig(seconds=3, seed=5, num_videos=2, colours=tuple(tc.PALETTE))
  assert tc.generate_video(default, 1).captions == tc.generate_video(explicit, 1).captions
