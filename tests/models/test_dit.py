"""VideoDiT: shapes, layer scan = loop, remat, TTT placement and reach."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ttt_jax.layout import VideoLayout
from ttt_jax.models.dit import VideoDiT

# Three 1-frame segments on a 2x3 token grid (latents 4x6), 4-token captions.
LAYOUT = VideoLayout(text_lens=(4, 4, 4), segment_frames=(2, 1, 1), height=2, width=3)
TTT = dict(inner="mlp", mini_batch_size=8, remat_group=2)
# Small settings of every baseline of the global slot (ttt_jax.layers.sequence).
BASELINES = dict(sliding_window=dict(window=64), full_attention={},
                 mamba2=dict(state_dim=8, chunk_size=8), gated_deltanet=dict(chunk_size=8),
                 lact=dict(chunk_size=16, muon_steps=2))


def make_model(seed=0, **kw):
  model = VideoDiT.from_config("tiny", **{"ttt": TTT, "baselines": BASELINES, **kw},
                               rngs=nnx.Rngs(seed))
  # adaLN-Zero makes a fresh model output zeros; give every weight some signal.
  params = nnx.state(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      treedef, [p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]))
  return model


def apply(model, latents, text, t, layout=LAYOUT):
  return nnx.jit(lambda m, *a: m(*a, layout))(model, latents, text, t)


def make_inputs(B=2, layout=LAYOUT, seed=0):
  ks = jax.random.split(jax.random.key(seed), 3)
  latents = jax.random.normal(ks[0], (B, layout.num_frames, 2 * layout.height, 2 * layout.width, 16))
  text = jax.random.normal(ks[1], (B, layout.num_text, 32))
  t = jax.random.randint(ks[2], (B,), 0, 1000)
  return latents, text, t


@pytest.mark.parametrize("variant,width,depth", [("tiny", 64, 2), ("small", 128, 4)])
def test_output_shape_and_zero_init(variant, width, depth):
  latents, text, t = make_inputs()
  fresh = VideoDiT.from_config(variant, ttt=TTT, rngs=nnx.Rngs(0))
  v = apply(fresh, latents, text, t)
  assert v.shape == latents.shape
  np.testing.assert_array_equal(v, 0.0)  # zero-initialised output projection
  # The layer scan stacks every block's weights on a leading [depth] axis; the attention
  # output projection is [depth, width, width].
  shapes = {tuple(x.shape) for x in jax.tree.leaves(nnx.state(fresh.blocks, nnx.Param))}
  assert (depth, width, width) in shapes and all(s[0] == depth for s in shapes)


def test_patchify_roundtrip():
  latents, _, _ = make_inputs()
  model = make_model()
  tokens = model.patchify(latents)
  assert tokens.shape == (2, LAYOUT.num_video, 64)
  np.testing.assert_array_equal(model.unpatchify(tokens, *latents.shape[1:4]), latents)
  # token order is (frame, row, column): token 1 is the patch at row 0, column 1; its
  # features are (channel, row, column) like a Conv2d weight [D, C, p, p].
  np.testing.assert_array_equal(tokens[0, 1].reshape(16, 2, 2),
                                latents[0, 0, 0:2, 2:4].transpose(2, 0, 1))


def test_layer_scan_equals_python_loop_and_remat():
  latents, text, t = make_inputs()
  scanned = make_model()
  out = apply(scanned, latents, text, t)
  assert scanned.blocks.ff_in.kernel[...].shape[0] == 2  # stacked depth axis
  loop = make_model(scan_layers=False)
  np.testing.assert_allclose(apply(loop, latents, text, t), out, rtol=1e-5, atol=1e-5)
  for policy in ("full", "save_dots"):
    remat = make_model(remat_policy=policy)
    np.testing.assert_allclose(apply(remat, latents, text, t), out, rtol=1e-5, atol=1e-5)
  grad = nnx.jit(nnx.grad(lambda m: jnp.sum(m(latents, text, t, LAYOUT) ** 2)))
  g1, g2 = grad(scanned), grad(make_model(remat_policy="full"))
  # Remat recomputes in another fusion order: fp32 round-off relative to each leaf's scale
  # (gradients here reach ~1e2, where 1e-5 absolute is below one ulp's worth of summands).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6 * float(np.abs(b).max())),
               nnx.state(g1, nnx.Param), nnx.state(g2, nnx.Param))


def test_ttt_sits_in_every_block_as_a_gated_residual():
  latents, text, t = make_inputs()
  with_ttt = make_model()
  assert with_ttt.blocks.ttt.ttt.W1[...].shape[0] == 2  # one TTT layer per block
  without = make_model(sequence_layer="local")
  assert without.blocks.ttt is None
  # Share every non-TTT weight, then close the TTT gates: the models agree.
  nnx.update(with_ttt, nnx.state(without, nnx.Param))
  for name in ("alpha_fwd_text", "alpha_fwd_video", "alpha_bwd_text", "alpha_bwd_video"):
    alpha = getattr(with_ttt.blocks.ttt, name)
    alpha[...] = jnp.zeros_like(alpha[...])
  np.testing.assert_allclose(apply(with_ttt, latents, text, t), apply(without, latents, text, t),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layer", ["local", "ttt", *BASELINES])
def test_attention_is_local_and_the_sequence_layer_is_global(layer):
  """With one block, segment 2 sees segment 0's caption only through the global slot: TTT or
  any baseline in its place (the 36-token video fits one window / chunk of theirs)."""
  latents, text, t = make_inputs()
  model = make_model(depth=1, sequence_layer=layer)
  out = apply(model, latents, text, t)
  out2 = apply(model, latents, text.at[:, :4].add(1.0), t)  # change caption 0 only
  seg2 = slice(3, 4)  # frame 3 belongs to segment 2 alone
  changed = float(jnp.abs(out[:, seg2] - out2[:, seg2]).max())
  assert (changed > 1e-4) == (layer != "local"), changed
  assert float(jnp.abs(out[:, :2] - out2[:, :2]).max()) > 1e-4  # segment 0 sees its caption


def test_single_scene_and_jit():
  layout = VideoLayout.from_seconds(3, text_len=6, height=2, width=3, frames_per_segment=2)
  latents, text, t = make_inputs(layout=layout)
  model = make_model()
  out = nnx.jit(lambda m, *a: m(*a, layout))(model, latents, text, t)
  np.testing.assert_allclose(out, apply(model, latents, text, t, layout), rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_mismatch():
  latents, text, t = make_inputs()
  model = make_model()
  with pytest.raises(ValueError, match="do not match the layout"):
    apply(model, latents, text[:, :-1], t)
  with pytest.raises(ValueError, match="16 channels"):
    apply(model, latents[..., :8], text, t)
  with pytest.raises(ValueError, match="unknown model variant 'huge'"):
    VideoDiT.from_config("huge", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="remat_policy"):
    make_model(remat_policy="sometimes")


@pytest.mark.parametrize("impl, remat_policy", [
    # TPU interpret mode simulates the kernel with io_callbacks, effects that
    # remat cannot partial-evaluate; the native kernels have none (see the
    # export below), so only the interpreted TPU run goes without remat.
    ("pallas_tpu", "none"),
    ("pallas_gpu", "full"),
])
def test_whole_model_runs_on_the_fused_kernels(impl, remat_policy):
  """The scanned DiT with its TTT layers on a fused kernel (interpret mode)
  gives the XLA model's outputs and parameter gradients. K = 16: the GPU
  kernels' smallest token tile (head_dim 16 as well)."""
  latents, text, t = make_inputs()
  ttt = {**TTT, "mini_batch_size": 16}
  xla = make_model(ttt=ttt, remat_policy=remat_policy)
  fused = make_model(ttt={**ttt, "impl": impl, "pallas_interpret": True},
                     remat_policy=remat_policy)
  np.testing.assert_allclose(apply(fused, latents, text, t), apply(xla, latents, text, t),
                             rtol=1e-5, atol=1e-5)
  loss = lambda m, *a: jnp.mean(m(*a, LAYOUT) ** 2)
  grad = nnx.jit(nnx.grad(loss))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               nnx.state(grad(fused, latents, text, t), nnx.Param),
               nnx.state(grad(xla, latents, text, t), nnx.Param))


def test_whole_model_gradient_exports_for_tpu_with_remat():
  """The rematerialised, scanned model's training gradient on the native TPU
  kernels lowers for TPU: the Mosaic forward-with-checkpoints and backward
  kernels appear in the program, no effect or remat issue on the way."""
  latents, text, t = make_inputs()
  model = make_model(ttt={**TTT, "mini_batch_size": 16, "impl": "pallas_tpu"},
                     remat_policy="full")
  graphdef, params = nnx.split(model)

  def grads(params, *a):
    return jax.grad(lambda p: jnp.mean(nnx.merge(graphdef, p)(*a, LAYOUT) ** 2))(params)

  text_ir = jax.export.export(jax.jit(grads), platforms=["tpu"])(
      params, latents, text, t).mlir_module()
  assert text_ir.count('kernel_name = "ttt_mlp_bwd"') >= 1
  assert text_ir.count('kernel_name = "ttt_mlp_fwd_res"') >= 1
