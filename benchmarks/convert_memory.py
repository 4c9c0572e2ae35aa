"""Peak memory of `python -m ttt_jax.convert cogvideox` on a synthetic sharded checkpoint.

    python benchmarks/convert_memory.py                 # ~2.3 GB bf16, 5 shards
    python benchmarks/convert_memory.py --depth=2 --width=256   # a quick smoke run

Writes a diffusers-format CogVideoX transformer folder (config.json, sharded
safetensors and their index) with random bf16 weights, then converts it in a
fresh subprocess and reports that process's peak RSS (getrusage of the
child) against the weights' size: the target is <= 1.3x, so that converting
CogVideoX-5B (11.1 GB bf16) fits a 24 GiB host. Prints one JSON line.
"""

from __future__ import annotations

import json
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

from ttt_jax import convert

flags.DEFINE_integer("width", 2048, "Model width (heads of 64).")
flags.DEFINE_integer("depth", 18, "Transformer blocks.")
flags.DEFINE_integer("text_dim", 4096, "Text embedding width.")
flags.DEFINE_integer("shard_mb", 500, "Approximate shard size.")
flags.DEFINE_string("workdir", None, "Where to write (default: a temporary folder, removed).")
FLAGS = flags.FLAGS


def write_checkpoint(directory: pathlib.Path, width: int, depth: int, text_dim: int,
                     shard_bytes: int) -> int:
  """A random bf16 CogVideoX transformer folder; returns the weights' bytes."""
  config = dict(_class_name=convert.DIFFUSERS_CLASS, num_attention_heads=width // 64,
                attention_head_dim=64, num_layers=depth, text_embed_dim=text_dim,
                use_rotary_positional_embeddings=True, sample_height=60, sample_width=90)
  directory.mkdir(parents=True)
  (directory / "config.json").write_text(json.dumps(config))
  arch = convert.architecture(convert.read_diffusers_config(directory))
  keys = [(e.source.format(i=i), e.source_shape) for e in convert.cogvideox_entries(arch)
          for i in (range(depth) if e.per_block else [None])]
  rng = np.random.default_rng(0)
  shards: list[dict[str, np.ndarray]] = [{}]
  size = total = 0
  for key, shape in keys:
    tensor = (0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
    if size + tensor.nbytes > shard_bytes and shards[-1]:
      shards.append({})
      size = 0
    shards[-1][key] = tensor
    size += tensor.nbytes
    total += tensor.nbytes
  weight_map = {}
  for n, shard in enumerate(shards, 1):
    name = f"diffusion_pytorch_model-{n:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, directory / name)
    weight_map.update({k: name for k in shard})
  index = dict(metadata=dict(total_size=total), weight_map=weight_map)
  (directory / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
  return total


def main(argv):
  del argv
  root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="convert_memory_"))
  try:
    src, dst = root / "transformer", root / "converted"
    weight_bytes = write_checkpoint(src, FLAGS.width, FLAGS.depth, FLAGS.text_dim,
                                    FLAGS.shard_mb * 2**20)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ttt_jax.convert", "cogvideox", f"--src={src}",
                           f"--dst={dst}"], capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode:
      raise SystemExit(proc.stderr[-4000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    assert peak > before * 1024, "the converter's RSS was not measured"
    out_bytes = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(json.dumps(dict(
        width=FLAGS.width, depth=FLAGS.depth, shards=len(list(src.glob("*.safetensors"))),
        weights_gb=weight_bytes / 1e9, output_gb=out_bytes / 1e9, peak_rss_gb=peak / 1e9,
        peak_over_weights=peak / weight_bytes, seconds=seconds)))
  finally:
    if FLAGS.workdir is None:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
