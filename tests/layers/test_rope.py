"""3D RoPE: band split, norm preservation, relative-position property."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.layers.rope import apply_rope, band_dims, rope_angles


def test_band_dims_match_cogvideox():
  assert band_dims(64) == (16, 24, 24)
  assert band_dims(128) == (32, 48, 48)
  with pytest.raises(ValueError, match="divisible by 16"):
    band_dims(40)


def _rotate(x, pos):
  return apply_rope(x, rope_angles(jnp.asarray(pos), x.shape[-1]))


def test_rotation_preserves_norm_and_origin_is_identity():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 64))
  pos = jax.random.randint(jax.random.key(1), (5, 3), 0, 50)
  np.testing.assert_allclose(jnp.linalg.norm(_rotate(x, pos), axis=-1),
                             jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(_rotate(x, np.zeros((5, 3), np.int32)), x)


def test_scores_depend_only_on_relative_position():
  q, k = jax.random.normal(jax.random.key(2), (2, 1, 1, 1, 64))
  p1, p2 = np.array([[3, 7, 2]]), np.array([[1, 4, 9]])
  shift = np.array([[5, 11, 6]])
  score = lambda a, b: jnp.sum(_rotate(q, a) * _rotate(k, b))
  np.testing.assert_allclose(score(p1, p2), score(p1 + shift, p2 + shift), rtol=1e-4)
  assert abs(float(score(p1, p2) - score(p1, p2 + shift))) > 1e-3


@pytest.mark.parametrize("axis,band", [(0, slice(0, 16)), (1, slice(16, 40)), (2, slice(40, 64))])
def test_each_axis_rotates_only_its_band(axis, band):
  x = jax.random.normal(jax.random.key(3), (1, 1, 1, 64))
  pos = np.zeros((1, 3), np.int32)
  pos[0, axis] = 7
  changed = np.abs(np.asarray(_rotate(x, pos) - x))[0, 0, 0] > 1e-6
  expected = np.zeros(64, bool)
  expected[band] = True
  np.testing.assert_array_equal(changed, expected)
