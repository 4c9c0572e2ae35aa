"""The HLO readers the multi-device tests rely on find what they look for."""

from tests.hlo import collectives, collectives_in_while_bodies, computations

_HLO = """
HloModule m

%inner_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %ag = f32[4,8]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %ag)
}

%inner_cond (p: (s32[], f32[4,8])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

%outer_body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %w = (s32[], f32[4,8]) while(%p), condition=%inner_cond, body=%inner_body
  %ar = f32[16]{0} all-reduce(%y), channel_id=2, to_apply=%add
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %z)
}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {
  %a = f32[4,8] parameter(0)
  %a2a = (f32[1,41,1,16]{3,2,1,0}, f32[1,41,1,16]{3,2,1,0}) all-to-all(%u, %v), channel_id=3
  %w = (s32[], f32[4,8]) while(%t0), condition=%inner_cond, body=%outer_body
  ROOT %r = f32[4,8] get-tuple-element(%w), index=1
}
"""


def test_collectives_and_shapes():
  comps = computations(_HLO)
  assert set(comps) == {"inner_body", "inner_cond", "outer_body", "main"}
  assert collectives(comps["main"]) == [("all-to-all", [(1, 41, 1, 16), (1, 41, 1, 16)])]
  assert collectives(comps["inner_body"]) == [("all-gather", [(4, 8)])]


def test_collectives_in_while_bodies_by_depth():
  # depth >= 1: the outer loop's all-reduce, and the nested loop's all-gather (inside both)
  assert collectives_in_while_bodies(_HLO) == [("inner_body", "all-gather"),
                                               ("outer_body", "all-gather"),
                                               ("outer_body", "all-reduce")]
  # depth >= 2: only what runs inside the loop nested in another
  assert collectives_in_while_bodies(_HLO, min_depth=2) == [("inner_body", "all-gather")]
  assert collectives_in_while_bodies(_HLO.replace("all-gather", "add"), min_depth=2) == []
