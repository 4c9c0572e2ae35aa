"""Pretrained CogVideoX weights (diffusers format) -> ttt-jax `VideoDiT`.

    python -m ttt_jax.convert cogvideox --src=DIR --dst=OUT

DIR is a diffusers checkpoint of `CogVideoXTransformer3DModel`: the pipeline
root (with `transformer/`) or the `transformer/` folder itself, holding
`config.json` and one or more `*.safetensors` (sharded ones with their
`*.safetensors.index.json`). OUT becomes an Orbax checkpoint of the DiT's
parameters in the scanned-layer layout (every block's tensors stacked on a
leading [depth] axis), in the source dtype, plus `model.json` with the
architecture. It is written to a temporary folder and renamed when complete.

Tensors are read one at a time (`ttt_jax.weights`) and written into
their place in the stacked arrays, so converting needs about the
weights' size in memory (CogVideoX-5B: 11 GB in bf16), not twice that.

Python API:
  load_cogvideox(path, **overrides) -> VideoDiT  (TTT off unless overridden)
  load_pretrained(path, model)   the CogVideoX parameters of a converted OUT
                                 or a diffusers DIR into an existing model
                                 (e.g. one with TTT layers, which keep their
                                 initialisation); what `model.pretrained` does.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import tempfile
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from flax import nnx, traverse_util

from ttt_jax.weights import Entry, SafetensorsCheckpoint, same, stream, transposed
from ttt_jax.models import dit

MODEL_JSON = "model.json"
PARAMS_DIR = "params"
DIFFUSERS_CLASS = "CogVideoXTransformer3DModel"
TTT_SCOPE = "ttt"  # the blocks' TTT sub-module: not part of CogVideoX

# diffusers' constructor defaults, for config.json files that leave keys out.
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16,
    flip_sin_to_cos=True, freq_shift=0, time_embed_dim=512, ofs_embed_dim=None,
    text_embed_dim=4096, num_layers=30, attention_bias=True, sample_width=90,
    sample_height=60, patch_size=2, patch_size_t=None, activation_fn="gelu-approximate",
    timestep_activation_fn="silu", norm_elementwise_affine=True, norm_eps=1e-5,
    use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False,
    patch_bias=True)

# What this DiT implements (CogVideoX 1.0 with RoPE: 5B); anything else is refused by name.
REQUIRED = dict(
    use_rotary_positional_embeddings=(True, "sincos positions (CogVideoX-2B) are not supported"),
    use_learned_positional_embeddings=(False, "learned positions (5B-I2V) are not supported"),
    patch_size_t=(None, "temporal patches (CogVideoX 1.5) are not supported"),
    ofs_embed_dim=(None, "the ofs embedding (CogVideoX 1.5-I2V) is not supported"),
    flip_sin_to_cos=(True, "the time embedding is [cos, sin]"),
    freq_shift=(0, "the time embedding has no frequency shift"),
    activation_fn=("gelu-approximate", "the MLP is GELU(tanh)"),
    timestep_activation_fn=("silu", "the time MLP uses SiLU"),
    attention_bias=(True, "attention projections have biases"),
    norm_elementwise_affine=(True, "LayerNorms are affine"),
    patch_bias=(True, "the patch embedding has a bias"),
)


# ----------------------------------------------------------------- config ----
def transformer_dir(path: str | pathlib.Path) -> pathlib.Path:
  """The folder holding the transformer's config.json: `path` or `path/transformer`."""
  path = pathlib.Path(path)
  for candidate in (path / "transformer", path):
    if (candidate / "config.json").is_file():
      return candidate
  raise FileNotFoundError(f"{path}: no config.json in it or in {path / 'transformer'}; expected a "
                          f"diffusers CogVideoX pipeline root or its transformer/ folder")


def read_diffusers_config(path: str | pathlib.Path) -> dict[str, Any]:
  """The transformer's config.json, defaults filled in and every unsupported setting refused."""
  file = transformer_dir(path) / "config.json"
  raw = json.loads(file.read_text())
  if raw.get("_class_name", DIFFUSERS_CLASS) != DIFFUSERS_CLASS:
    raise ValueError(f"{file}: _class_name is {raw['_class_name']!r}, expected {DIFFUSERS_CLASS!r}")
  cfg = {**DIFFUSERS_DEFAULTS, **raw}
  bad = [f"{key}={cfg[key]!r} ({why}; need {want!r})" for key, (want, why) in REQUIRED.items()
         if cfg[key] != want]
  if cfg["in_channels"] != cfg["out_channels"]:
    bad.append(f"in_channels={cfg['in_channels']} != out_channels={cfg['out_channels']}")
  if bad:
    raise ValueError(f"{file}: unsupported CogVideoX settings: " + "; ".join(bad))
  return cfg


def architecture(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """VideoDiT architecture kwargs of a diffusers CogVideoX config."""
  return dict(width=cfg["num_attention_heads"] * cfg["attention_head_dim"],
              depth=cfg["num_layers"], num_heads=cfg["num_attention_heads"],
              text_dim=cfg["text_embed_dim"], time_embed_dim=cfg["time_embed_dim"],
              latent_channels=cfg["in_channels"], patch_size=cfg["patch_size"], mlp_ratio=4,
              norm_eps=cfg["norm_eps"], sample_size=(cfg["sample_height"], cfg["sample_width"]))


# ----------------------------------------------------------- key mapping ----
def _conv_patch(w: np.ndarray) -> np.ndarray:  # Conv2d [D, C, p, p] -> kernel [C*p*p, D]
  return w.reshape(w.shape[0], -1).T


def cogvideox_entries(arch: Mapping[str, Any]) -> list[Entry]:
  """The whole mapping diffusers CogVideoX 1.0 -> VideoDiT of `arch` (TTT excluded)."""
  D, E, F = arch["width"], arch["time_embed_dim"], arch["mlp_ratio"] * arch["width"]
  C, p, hd = arch["latent_channels"], arch["patch_size"], arch["width"] // arch["num_heads"]

  def linear(target, source, n_in, n_out):
    return [Entry((*target, "kernel"), f"{source}.weight", (n_out, n_in), transposed),
            Entry((*target, "bias"), f"{source}.bias", (n_out,), same)]

  def norm(target, source, n):
    return [Entry((*target, "scale"), f"{source}.weight", (n,), same),
            Entry((*target, "bias"), f"{source}.bias", (n,), same)]

  blk = lambda name: ("blocks", *name.split("/"))
  src = lambda name: f"transformer_blocks.{{i}}.{name}"
  return [
      Entry(("patch_embed", "kernel"), "patch_embed.proj.weight", (D, C, p, p), _conv_patch),
      Entry(("patch_embed", "bias"), "patch_embed.proj.bias", (D,), same),
      *linear(("text_proj",), "patch_embed.text_proj", arch["text_dim"], D),
      *linear(("time_in",), "time_embedding.linear_1", D, E),
      *linear(("time_out",), "time_embedding.linear_2", E, E),
      *[e for n in ("norm1", "norm2") for e in
        linear(blk(f"{n}/linear"), src(f"{n}.linear"), E, 6 * D) + norm(blk(f"{n}/norm"), src(f"{n}.norm"), D)],
      *[e for ours, theirs in (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0"))
        for e in linear(blk(f"attn/{ours}"), src(f"attn1.{theirs}"), D, D)],
      *norm(blk("attn/norm_q"), src("attn1.norm_q"), hd),
      *norm(blk("attn/norm_k"), src("attn1.norm_k"), hd),
      *linear(blk("ff_in"), src("ff.net.0.proj"), D, F),
      *linear(blk("ff_out"), src("ff.net.2"), F, D),
      *norm(("norm_final",), "norm_final", D),
      *linear(("out_mod",), "norm_out.linear", E, 2 * D),
      *norm(("norm_out",), "norm_out.norm", D),
      *linear(("proj_out",), "proj_out", D, C * p * p),
  ]


# ------------------------------------------------------------- streaming ----
def stream_cogvideox(path: str | pathlib.Path, *, progress: bool = False
                     ) -> tuple[dict[str, Any], Iterator[tuple[tuple[str, ...], np.ndarray]]]:
  """(architecture, iterator of (parameter path, array in the source dtype)).

  Every key is checked before the first tensor is read. Per-block tensors
  are read one by one into their slot of the stacked array, so beyond what
  the caller keeps at most one parameter's stack is in memory.
  """
  directory = transformer_dir(path)
  arch = architecture(read_diffusers_config(directory))
  ckpt = SafetensorsCheckpoint(directory)
  entries = cogvideox_entries(arch)
  ckpt.check(entries, arch["depth"], what="CogVideoX")
  return arch, stream(ckpt, entries, arch["depth"], desc="converting CogVideoX", progress=progress)


# ------------------------------------------------------------ converting ----
def _streaming_save_handler() -> ocp.PyTreeCheckpointHandler:
  """An Orbax handler that writes host arrays without another copy of them.

  Orbax's defaults deep-copy every numpy leaf before an async write and
  compress all of them in flight: measured on a 2.3 GB checkpoint, +1.7x the
  weights' size at peak. Without the copy (the arrays are not touched while
  the synchronous save runs) and without compression, writing adds ~nothing
  to what the converter already holds (benchmarks/convert_memory.py).
  """
  numpy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
  return ocp.PyTreeCheckpointHandler(
      type_handler_registry=ocp.type_handlers.create_type_handler_registry((np.ndarray, numpy)),
      use_compression=False, save_concurrent_gb=1)


def convert_cogvideox(src: str | pathlib.Path, dst: str | pathlib.Path, *,
                      progress: bool = True) -> pathlib.Path:
  """diffusers DIR -> OUT (Orbax params + model.json), atomically; returns OUT."""
  dst = pathlib.Path(dst).absolute()
  if dst.exists():
    raise FileExistsError(f"{dst} already exists; remove it or choose another --dst")
  arch, arrays = stream_cogvideox(src, progress=progress)
  params = traverse_util.unflatten_dict(dict(arrays))  # the weights' size: the only full copy
  dst.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
  try:
    with ocp.Checkpointer(_streaming_save_handler()) as checkpointer:
      checkpointer.save(tmp / PARAMS_DIR, args=ocp.args.PyTreeSave(params))
    meta = dict(format="ttt_jax.convert/cogvideox", source=str(transformer_dir(src).absolute()),
                architecture=arch)
    (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    tmp.rename(dst)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return dst


# --------------------------------------------------------------- loading ----
def pretrained_architecture(path: str | pathlib.Path) -> dict[str, Any]:
  """The architecture of a converted OUT (model.json) or a diffusers DIR (config.json)."""
  path = pathlib.Path(path)
  if (path / MODEL_JSON).is_file():
    arch = json.loads((path / MODEL_JSON).read_text())["architecture"]
    return {**arch, "sample_size": tuple(arch["sample_size"])}
  if not path.exists():
    raise FileNotFoundError(f"pretrained weights {path} do not exist")
  return architecture(read_diffusers_config(path))


def check_architecture(model: dit.VideoDiT, arch: Mapping[str, Any], source: str) -> None:
  """ValueError naming every architecture field where `model` and the weights differ."""
  diff = [f"{k}: model {model.arch[k]!r}, weights {arch[k]!r}" for k in arch
          if model.arch.get(k) != arch[k]]
  if diff:
    raise ValueError(f"pretrained weights {source} do not fit this model (choose a model.variant "
                     f"with their architecture): " + "; ".join(diff))


def _model_params(model: dit.VideoDiT) -> dict[tuple[str, ...], nnx.Variable]:
  return {tuple(str(k) for k in path): var
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assign(model: dit.VideoDiT, arrays: Iterable[tuple[tuple[str, ...], Any]], source: str) -> None:
  """Writes every (path, array) into the model (cast, placed like the parameter it replaces).

  Every parameter outside the TTT layers must be among them: nothing of
  CogVideoX may silently keep its random initialisation.
  """
  params = _model_params(model)
  done = set()
  for path, value in arrays:
    if path not in params:
      raise ValueError(f"{source}: parameter {'/'.join(path)} does not exist in this model")
    var = params[path]
    if tuple(value.shape) != tuple(var.shape):
      raise ValueError(f"{source}: parameter {'/'.join(path)} has shape {tuple(value.shape)}, "
                       f"the model's is {tuple(var.shape)}")
    var[...] = jax.device_put(np.asarray(value, var.dtype), var[...].sharding)
    done.add(path)
  missing = sorted("/".join(p) for p in params if p not in done and TTT_SCOPE not in p)
  if missing:
    raise ValueError(f"{source}: no weights for {len(missing)} CogVideoX parameter(s): {missing}")


def _restore_converted(directory: pathlib.Path, model: dit.VideoDiT
                       ) -> Iterable[tuple[tuple[str, ...], Any]]:
  """The parameters of a converted checkpoint, restored (and cast) into the model's dtypes."""
  params = _model_params(model)
  with ocp.StandardCheckpointer() as checkpointer:
    stored = list(traverse_util.flatten_dict(checkpointer.metadata(directory).item_metadata.tree))
    unknown = sorted("/".join(p) for p in stored if p not in params)
    if unknown:
      raise ValueError(f"{directory}: parameters this model does not have: {unknown}")
    target = traverse_util.unflatten_dict(
        {p: ocp.utils.to_shape_dtype_struct(params[p][...]) for p in stored})
    return traverse_util.flatten_dict(checkpointer.restore(directory, target)).items()


def load_pretrained(path: str | pathlib.Path, model: dit.VideoDiT) -> None:
  """Loads CogVideoX weights (a converted OUT or a diffusers DIR) into `model`.

  Every non-TTT parameter is replaced (cast to the model's parameter dtype);
  the TTT layers and their gates keep their initialisation, so the model
  starts as CogVideoX plus a small gated TTT residual. The architectures
  must agree field by field.
  """
  path = pathlib.Path(path).absolute()
  check_architecture(model, pretrained_architecture(path), str(path))
  if (path / MODEL_JSON).is_file():
    arrays = _restore_converted(path / PARAMS_DIR, model)
  else:  # a diffusers folder: converted on the fly
    arrays = stream_cogvideox(path)[1]
  _assign(model, arrays, str(path))


def load_cogvideox(path: str | pathlib.Path, *, rngs: nnx.Rngs | None = None,
                   **model_overrides: Any) -> dit.VideoDiT:
  """A `VideoDiT` with the CogVideoX weights of `path` (diffusers DIR or converted OUT).

  The architecture comes from the weights; `model_overrides` set the rest
  (sequence_layer="local" unless given, ttt={...}, dtype, remat_policy, ...).
  """
  arch = pretrained_architecture(path)
  clash = sorted(set(arch) & set(model_overrides))
  if clash:
    raise ValueError(f"load_cogvideox: {clash} come from the weights' config and cannot be overridden")
  model = dit.VideoDiT(**arch, **{"sequence_layer": "local", **model_overrides},
                       rngs=rngs or nnx.Rngs(0))
  load_pretrained(path, model)
  return model


# ------------------------------------------------------------------- CLI ----
FLAGS = flags.FLAGS
CONVERTERS = {"cogvideox": convert_cogvideox}


def main(argv: list[str]) -> None:
  if len(argv) != 2 or argv[1] not in CONVERTERS:
    raise app.UsageError(f"usage: python -m ttt_jax.convert {{{'|'.join(CONVERTERS)}}} "
                         f"--src=DIR --dst=OUT")
  out = CONVERTERS[argv[1]](FLAGS.src, FLAGS.dst)
  print(json.dumps({"converted": str(out)}))


if __name__ == "__main__":
  flags.DEFINE_string("src", None, "diffusers checkpoint: pipeline root or its transformer/ folder.")
  flags.DEFINE_string("dst", None, "Output folder (must not exist).")
  flags.mark_flags_as_required(["src", "dst"])
  app.run(main)
