"""T5 v1.1 encoder + tokenizer == transformers' T5EncoderModel + T5Tokenizer, as CogVideoX uses them.

References built in the test, offline: a tiny sentencepiece model trained on
a few sentences (T5's pad 0 / eos 1 / unk 2), a tiny random T5EncoderModel
saved as safetensors, and the CogVideoX pipeline's tokenizer call (pad to
max_length, truncate, add </s>) with the encoder run without an attention
mask. Tolerance 1e-4 relative to the output's max in fp32.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import sentencepiece as spm
import torch
from flax import nnx
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from ttt_jax.data import pipeline
from ttt_jax.models import t5
from ttt_jax.models.text import make_text_encoder

CORPUS = ["a brown cat chases a small grey mouse across the kitchen floor",
          "the mouse jumps over the sleeping dog in the garden at noon",
          "night falls on the street and the cat walks home slowly",
          "a dog runs after the ball while the mouse hides under the table"] * 20
CAPTIONS = ["A brown cat chases the mouse.", "", "the dog hops in the garden at night " * 6,
            "unseen words: zebra quokka"]
MAX_LEN = 40  # > 32: key-query distances reach T5's log-spaced buckets


@pytest.fixture(scope="module")
def pipeline_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("cogvideox_t5")
  (root / "tokenizer").mkdir()
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_writer=model,
                                 vocab_size=48, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 model_type="unigram")
  (root / "tokenizer" / "spiece.model").write_bytes(model.getvalue())
  torch.manual_seed(0)
  ref = T5EncoderModel(T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=48, num_layers=3,
                                num_heads=4, feed_forward_proj="gated-gelu")).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
  ref.save_pretrained(root / "text_encoder", safe_serialization=True)
  return root, ref


def reference(root, ref, captions, max_len):
  tok = T5Tokenizer.from_pretrained(str(root / "tokenizer"))
  ids = tok(list(captions), padding="max_length", max_length=max_len, truncation=True,
            add_special_tokens=True, return_tensors="pt").input_ids
  with torch.no_grad():
    return ids.numpy(), ref(input_ids=ids)[0].numpy()


def test_tokens_and_embeddings_match_transformers(pipeline_root):
  root, ref = pipeline_root
  encoder = make_text_encoder("t5", path=root, dim=32)
  want_ids, want = reference(root, ref, CAPTIONS, MAX_LEN)
  np.testing.assert_array_equal(encoder.token_ids(CAPTIONS, MAX_LEN), want_ids)
  assert (want_ids[2] != 0).all() and want_ids[2, -1] == 1  # truncated, </s> kept last
  emb, mask = encoder.encode(CAPTIONS, MAX_LEN)
  assert emb.shape == (4, MAX_LEN, 32) and mask.dtype == bool
  np.testing.assert_array_equal(np.asarray(mask), want_ids != 0)
  err = np.abs(np.asarray(emb) - want).max() / np.abs(want).max()
  assert err < 1e-4, err
  # No attention mask: pads carry the model's values, not zeros (CogVideoX's conditioning).
  assert np.abs(np.asarray(emb)[1, 5:]).max() > 0.1


@pytest.mark.parametrize("length", [1, 8, 33, 300])
def test_relative_position_buckets_match_transformers(length):
  from transformers.models.t5.modeling_t5 import T5Attention
  rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
  want = T5Attention._relative_position_bucket(rel, bidirectional=True, num_buckets=32,
                                               max_distance=128).numpy()
  np.testing.assert_array_equal(t5.relative_position_buckets(length, 32, 128), want)


def test_bad_folders_are_named(pipeline_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer/spiece.model"):
    make_text_encoder("t5", path=tmp_path)
  root, _ = pipeline_root
  with pytest.raises(ValueError, match="data.text_dim=64 but the T5 encoder"):
    make_text_encoder("t5", path=root, dim=64)


def test_sharded_bf16_checkpoint_streams_to_the_same_weights(pipeline_root, tmp_path):
  root, ref = pipeline_root
  bf16 = copy.deepcopy(ref).to(torch.bfloat16)  # the fixture's model stays fp32
  bf16.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
  assert len(list(tmp_path.glob("*.safetensors"))) > 2
  a = t5.load_t5_encoder(tmp_path)
  b = t5.load_t5_encoder(root / "text_encoder")
  for (path, x), (_, y) in zip(nnx.to_flat_state(nnx.state(a, nnx.Param)),
                               nnx.to_flat_state(nnx.state(b, nnx.Param))):
    want = torch.from_numpy(np.asarray(y[...])).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(x[...]), want, err_msg=str(path))


def test_null_caption_is_t5_of_the_empty_string(pipeline_root):
  """CFG's null caption (training's text dropout and the sampler) is T5(""), per segment."""
  root, ref = pipeline_root
  encoder = make_text_encoder("t5", path=root)
  null = pipeline.null_caption(encoder, num_segments=3, text_len=8)
  _, want = reference(root, ref, [""], 8)
  assert null.shape == (24, 32)
  np.testing.assert_allclose(null.reshape(3, 8, 32), np.broadcast_to(want, (3, 8, 32)),
                             rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert np.abs(null).max() > 0.1  # not zeros: on the pretrained model's distribution
  toy = pipeline.null_caption(make_text_encoder("toy", dim=16), 2, 4)
  np.testing.assert_array_equal(toy, 0.0)  # the toy encoder's "" is pure padding
