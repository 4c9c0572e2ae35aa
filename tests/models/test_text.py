"""The toy text encoder: a deterministic, context-dependent stand-in for T5."""

import zlib

import jax.numpy as jnp
import numpy as np
import pytest

from ttt_jax.models.text import TextEncoder, ToyTextEncoder, make_text_encoder

DIM = 32
CAPTIONS = ["The red cat chases the mouse.", "", "a dog hops twice in the garden"]


@pytest.fixture(scope="module")
def encoder():
  return ToyTextEncoder(dim=DIM, vocab_size=4096, seed=0)


def test_interface_and_factory(encoder):
  assert isinstance(encoder, TextEncoder) and encoder.dim == DIM
  built = make_text_encoder("toy", dim=DIM, vocab_size=4096)
  np.testing.assert_array_equal(built.encode(CAPTIONS, 8)[0], encoder.encode(CAPTIONS, 8)[0])
  with pytest.raises(ValueError, match="known encoders: t5, toy"):
    make_text_encoder("t5-xxl")
  with pytest.raises(ValueError, match="even"):
    ToyTextEncoder(dim=33)
  with pytest.raises(TypeError):
    encoder.encode("a single string", 4)


def test_shapes_and_dtypes(encoder):
  emb, mask = encoder.encode(CAPTIONS, 12)
  assert emb.shape == (3, 12, DIM) and emb.dtype == jnp.float32
  assert mask.shape == (3, 12) and mask.dtype == jnp.bool_
  assert encoder.encode([], 12)[0].shape == (0, 12, DIM)
  assert encoder.encode(CAPTIONS, 0)[0].shape == (3, 0, DIM)


def test_determinism(encoder):
  emb, mask = encoder.encode(CAPTIONS, 16)
  again = encoder.encode(CAPTIONS, 16)
  fresh = ToyTextEncoder(dim=DIM, vocab_size=4096, seed=0).encode(CAPTIONS, 16)
  for other in (again, fresh):
    np.testing.assert_array_equal(other[0], emb)
    np.testing.assert_array_equal(other[1], mask)
  other_seed = ToyTextEncoder(dim=DIM, vocab_size=4096, seed=1).encode(CAPTIONS, 16)[0]
  assert not np.allclose(other_seed, emb)


def test_hash_and_values_are_stable():
  # CRC-32 ids are fixed by the standard, not by the process (unlike hash()).
  assert zlib.crc32(b"cat") == 2656977832
  encoder = ToyTextEncoder()  # defaults: dim 128, vocab 16384, seed 0
  assert encoder.tokenize("The CAT, chases-the mouse!") == [
      zlib.crc32(w.encode()) % 16384 for w in ("the", "cat", "chases", "the", "mouse")]
  assert encoder.tokenize("cat") == [936]
  # Pins the seeded table too, so stored embeddings stay valid across machines.
  emb, _ = encoder.encode(["cat"], 1)
  np.testing.assert_allclose(emb[0, 0, :4], [-0.1098128, 1.2022178, 0.2331561, -0.4440761],
                             atol=1e-6)


def test_padding_truncation_and_mask(encoder):
  caption = CAPTIONS[0]  # 6 words
  emb, mask = encoder.encode([caption], 10)
  np.testing.assert_array_equal(mask[0], [True] * 6 + [False] * 4)
  np.testing.assert_array_equal(emb[0, 6:], 0.0)
  # Real tokens come out at unit RMS and do not depend on how much padding follows.
  np.testing.assert_allclose(jnp.sqrt(jnp.mean(emb[0, :6] ** 2, axis=-1)), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(encoder.encode([caption], 20)[0][0, :6], emb[0, :6])
  # Truncation keeps the first max_len words, encoded as that shorter caption.
  short, short_mask = encoder.encode([caption], 3)
  assert bool(short_mask.all())
  np.testing.assert_array_equal(short, encoder.encode(["The red cat"], 3)[0])
  assert not np.allclose(short[0], emb[0, :3])  # the dropped words were context


def test_empty_caption_is_all_padding(encoder):
  emb, mask = encoder.encode(["", "  !!! 42 ...", "cat"], 6)
  np.testing.assert_array_equal(emb[:2], 0.0)
  assert not bool(mask[:2].any()) and bool(mask[2, 0])


def test_context_dependence(encoder):
  emb, _ = encoder.encode(["a red cat", "a blue cat", "a red cat", "A red CAT."], 3)
  assert not np.allclose(emb[0], emb[1])
  assert not np.allclose(emb[0, 2], emb[1, 2])  # "cat" at the same position, other context
  np.testing.assert_array_equal(emb[0], emb[2])
  np.testing.assert_array_equal(emb[0], emb[3])  # case and punctuation are not words
  # Word order matters through the position code.
  swapped, _ = encoder.encode(["cat red a"], 3)
  assert not np.allclose(swapped[0], emb[0, ::-1])
