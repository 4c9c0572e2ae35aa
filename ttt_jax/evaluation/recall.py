"""Multi-query associative recall (MQAR) for the DiT's global sequence-slot cores.

Can a core, when trained, carry information from the first segment to the
last? Zoology's MQAR (Arora et al. 2023) asks exactly that at the layer
level: K key-value pairs early, distractors, then the keys again; the loss is
on the values. Here the sequence is laid out as a `VideoLayout` the slot
reads in its own (TTT) order, and every token is one frame (height = width
= 1):

  segment 0          K pair tokens, each a key bound to its value ("the caption")
  segments 1..n      distractor tokens, `segment` per segment (the last ragged)
  segment n + 1      the K keys again, in a random order: the queries

Targets are the values paired with the queried keys, scored at the query
positions only; accuracy is the fraction of queries answered right. The
vocabulary is split into key, value and distractor ranges as Zoology does, so
chance is 1 / num_values (a model that only knew which values came earlier
would reach 1 / K).

One deviation from Zoology, on purpose: a pair is ONE token whose embedding
is E[key] + E[value], not a key token followed by a value token. In the DiT
a caption reaches the video already bound by its text encoder, and what the
slot must do is carry it; binding two adjacent tokens is a different skill,
which local attention would have to supply for every core (TTT and LaCT see
no order inside a chunk). Measured before this choice (width 32, K = 4, 44
tokens, 800 steps): with separate key and value tokens even full attention
stayed at 1/K = 0.25 held-out; with the value bound to its key it reached
1.00. So this measures carrying, the paper's question, not binding. With no
text tokens only the video gates of `Bidirectional` are used; the text gates
get no gradient.

The model: token embedding -> `depth` blocks -> LayerNorm -> linear head at
the query positions. A block is the DiT block without its timestep
modulation: pre-norm per-segment `LocalSelfAttention`, the slot
(`make_sequence_layer`, the DiT's own modules and options) on its output,
a residual, then a pre-norm GELU MLP. "local" has no slot, so it has exactly
the DiT's reach: a token sees its segment and the last frame of the previous
one, so the pairs reach segment index b after b blocks; the layout keeps at
least `depth` distractor segments, which puts the queries beyond that reach
(`RecallModel` checks it; the tests check it bitwise).

No answer leaks through the bidirectional slot: the slot runs its core
forwards and then backwards, so a token sees the whole sequence, but a
query position holds its key only and the targets are never inputs; a value
reaches a query only by being carried from the pairs. The backward pass does
read the queries before the pairs (as in "just read twice", Arora et al.
2024), which can only help a fixed-state core choose what to keep.

Training: AdamW with warm-up and cosine decay, every (lr, seed) of a
(variant, seq_len, pairs) group trained together, vmapped (one compile per
group). A seed fixes the initialisation, the training batches and the held-out
set, the same for every lr. Reported per seed: the held-out accuracy of the
lr that scored best on that held-out set (Zoology's protocol; with
`eval_batches * batch * K` held-out queries the bias of picking the best of a
few lrs is a fraction of a percentage point). Logged while training: loss,
accuracy, the gradient norm of each block's slot core (its parameters without
the gates) and the mean |tanh| of its forward and backward video gates.
Every finished (variant, seq_len, pairs, lr, seed) run is one JSON under
<workdir>/recall/runs/, skipped on a rerun.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from ttt_jax.evaluation import report
from ttt_jax.layers.attention import LocalSelfAttention
from ttt_jax.layers.linear import dense, layer_norm
from ttt_jax.layers.sequence import make_sequence_layer
from ttt_jax.layout import VideoLayout

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

Array = jax.Array

NORM_EPS = 1e-5
MLP_RATIO = 4
TTT_INNER = {"ttt_linear": "linear", "ttt_mlp": "mlp"}  # variants filling the slot with TTT


# ------------------------------------------------------------------ task ----
@dataclasses.dataclass(frozen=True)
class Task:
  """One MQAR setting: sequence length, pairs, distractor segment length and vocabulary."""

  seq_len: int
  pairs: int
  segment: int
  num_keys: int
  num_values: int
  num_distractors: int

  def __post_init__(self):
    if self.pairs > min(self.num_keys, self.num_values):
      raise ValueError(f"MQAR: {self.pairs} pairs need as many distinct keys and values, got "
                       f"{self.num_keys} keys and {self.num_values} values")
    if self.distractors < 1 or self.segment < 1:
      raise ValueError(f"MQAR: seq_len {self.seq_len} leaves no distractor after {self.pairs} "
                       f"pairs and queries, or segment {self.segment} < 1")

  @property
  def distractors(self) -> int:
    return self.seq_len - 2 * self.pairs

  @property
  def vocab_size(self) -> int:
    return self.num_keys + self.num_values + self.num_distractors

  @functools.cached_property
  def layout(self) -> VideoLayout:
    """Pairs, distractor segments (the last ragged), queries; one token per frame, no text."""
    n = -(-self.distractors // self.segment)
    frames = (self.pairs, *(self.segment,) * (n - 1),
              self.distractors - (n - 1) * self.segment, self.pairs)
    return VideoLayout(text_lens=(0,) * len(frames), segment_frames=frames, height=1, width=1)

  @property
  def distractor_segments(self) -> int:
    return self.layout.num_segments - 2


def make_batch(key: Array, task: Task, batch: int) -> tuple[Array, Array]:
  """tokens [B, L, 2] int32 and targets [B, K] int32 (values).

  tokens[..., 0] is each position's token: the K pair keys, the distractors,
  the queries; tokens[..., 1] the token bound to it (embeddings add): a pair's
  value, -1 (none) elsewhere. Keys and values are distinct within a sequence;
  queries are the keys in a random order, targets their values.
  """
  K = task.pairs
  k_keys, k_values, k_order, k_distract = jax.random.split(key, 4)
  draw = lambda k, n: jax.vmap(lambda r: jax.random.permutation(r, n)[:K])(
      jax.random.split(k, batch))  # [B, K] distinct in [0, n)
  keys = draw(k_keys, task.num_keys)
  values = task.num_keys + draw(k_values, task.num_values)
  order = jax.vmap(lambda r: jax.random.permutation(r, K))(jax.random.split(k_order, batch))
  distract = jax.random.randint(k_distract, (batch, task.distractors),
                                task.num_keys + task.num_values, task.vocab_size)
  queries = jnp.take_along_axis(keys, order, axis=1)
  first = jnp.concatenate([keys, distract, queries], axis=1)  # [B, L]
  none = jnp.full((batch, task.seq_len - K), -1, values.dtype)
  bound = jnp.concatenate([values, none], axis=1)  # [B, L]
  tokens = jnp.stack([first, bound], axis=-1).astype(jnp.int32)
  return tokens, jnp.take_along_axis(values, order, axis=1).astype(jnp.int32)


# ----------------------------------------------------------------- model ----
def slot_spec(variant: str, config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
  """(model.sequence_layer, its options) of a variant: ttt_linear / ttt_mlp are "ttt"."""
  if variant in TTT_INNER:
    return "ttt", dict(config["ttt"], inner=TTT_INNER[variant])
  return variant, dict(config["baselines"].get(variant, {}))


class RecallBlock(nnx.Module):
  """The DiT block without timestep modulation: local attention -> slot, residual; MLP."""

  def __init__(self, width: int, num_heads: int, sequence_layer: str,
               options: Mapping[str, Any], *, rngs: nnx.Rngs):
    kw = dict(dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)
    self.norm1 = layer_norm(width, NORM_EPS, **kw)
    self.attn = LocalSelfAttention(width, num_heads, **kw)
    self.slot = make_sequence_layer(sequence_layer, width, num_heads, options, **kw)
    self.norm2 = layer_norm(width, NORM_EPS, **kw)
    self.ff_in = dense(width, MLP_RATIO * width, ("embed", "mlp"), **kw)
    self.ff_out = dense(MLP_RATIO * width, width, ("mlp", "embed"), **kw)

  def __call__(self, x: Array, layout: VideoLayout) -> Array:
    a = self.attn(self.norm1(x), layout)  # [B, L, D]
    if self.slot is not None:
      a = self.slot(a, layout)  # as in DiTBlock: the slot refines local attention's output
    x = x + a
    return x + self.ff_out(jax.nn.gelu(self.ff_in(self.norm2(x)), approximate=True))


class RecallModel(nnx.Module):
  """Embedding -> blocks -> LayerNorm -> logits at the K query positions."""

  def __init__(self, task: Task, variant: str, config: Mapping[str, Any], *, rngs: nnx.Rngs):
    if task.distractor_segments < config["depth"]:
      raise ValueError(f"MQAR: {task.distractor_segments} distractor segments let "
                       f"{config['depth']} blocks of local attention reach the pairs from the "
                       f"queries; lengthen seq_len or shorten segment")
    width = config["width"]
    name, options = slot_spec(variant, config)
    self.task = task
    # N(0, 1) as torch's nn.Embedding (Zoology's): flax's default (std 1/sqrt(width)) leaves a
    # token's identity below local attention's O(1) output, whose average over the query
    # segment then makes every query look alike (accuracy stuck at 1/K).
    self.embed = nnx.Embed(task.vocab_size, width, embedding_init=nnx.initializers.normal(1.0),
                           rngs=rngs)
    self.blocks = nnx.List([RecallBlock(width, config["num_heads"], name, options, rngs=rngs)
                            for _ in range(config["depth"])])
    self.norm = layer_norm(width, NORM_EPS, rngs=rngs)
    self.head = dense(width, task.vocab_size, ("embed", "vocab"), rngs=rngs)

  def embed_tokens(self, tokens: Array) -> Array:
    """tokens [B, L, 2] (a token, its bound token or -1) -> [B, L, D]: their embeddings' sum."""
    bound = tokens[..., 1]
    return self.embed(tokens[..., 0]) + jnp.where(
        (bound >= 0)[..., None], self.embed(jnp.maximum(bound, 0)), 0.0)

  def __call__(self, tokens: Array) -> Array:
    """tokens [B, L, 2] -> logits [B, K, V] at the query positions (the last K)."""
    x = self.embed_tokens(tokens)  # [B, L, D]
    for block in self.blocks:
      x = block(x, self.task.layout)
    return self.head(self.norm(x[:, -self.task.pairs:]))


def diagnostics(model: RecallModel, grads: RecallModel) -> dict[str, Array]:
  """Per block: the slot core's gradient norm and mean |tanh gate| forwards / backwards."""
  out = dict(grad_norm=optax.global_norm(nnx.state(grads, nnx.Param)))
  slots = [(b.slot, g.slot) for b, g in zip(model.blocks, grads.blocks) if b.slot is not None]
  if slots:
    core = lambda s: nnx.state(getattr(s, s.family), nnx.Param)
    out["slot_grad_norm"] = jnp.stack([optax.global_norm(core(g)) for _, g in slots])
    gate = lambda a: jnp.abs(jnp.tanh(a[...])).mean()
    out["gate_fwd"] = jnp.stack([gate(s.alpha_fwd_video) for s, _ in slots])
    out["gate_bwd"] = jnp.stack([gate(s.alpha_bwd_video) for s, _ in slots])
  return out


# -------------------------------------------------------------- training ----
def optimizer(lr: Array, config: Mapping[str, Any]) -> optax.GradientTransformation:
  """Clipped AdamW, linear warm-up to lr then cosine decay to 0 (lr may be traced)."""
  shape = optax.warmup_cosine_decay_schedule(0.0, 1.0, config["warmup_steps"], config["steps"])
  schedule = lambda count: lr * shape(count)  # optax's schedules take no traced peak
  return optax.chain(optax.clip_by_global_norm(config["grad_clip"]),
                     optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=config["weight_decay"]))


def cross_entropy(logits: Array, targets: Array) -> tuple[Array, Array]:
  """Mean loss and accuracy over queries; logits [B, K, V], targets [B, K]."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return loss.mean(), (logits.argmax(-1) == targets).mean()


def train_group(task: Task, variant: str, config: Mapping[str, Any],
                runs: Sequence[tuple[float, int]], *, desc: str = "") -> list[dict[str, Any]]:
  """Trains the (lr, seed) runs of one (variant, task) together; one result dict each."""
  lrs = jnp.asarray([lr for lr, _ in runs], jnp.float32)  # [R]
  keys = jax.vmap(lambda s: jax.random.split(jax.random.key(s), 3))(
      jnp.asarray([seed for _, seed in runs]))  # [R, 3]: init, train data, held-out data
  batch, steps, every = config["batch"], config["steps"], config["log_every"]
  graphdef = nnx.graphdef(nnx.eval_shape(
      lambda: RecallModel(task, variant, config, rngs=nnx.Rngs(0))))

  def init(key: Array, lr: Array) -> tuple[nnx.State, optax.OptState]:
    params = nnx.state(RecallModel(task, variant, config, rngs=nnx.Rngs(key)))
    return params, optimizer(lr, config).init(params)

  def step(carry, i, lr, key):
    """One AdamW step of one run on batch i of its training stream."""
    params, opt_state = carry
    tokens, targets = make_batch(jax.random.fold_in(key, i), task, batch)

    def loss_fn(p):
      return cross_entropy(nnx.merge(graphdef, p)(tokens), targets)

    (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    logs = diagnostics(nnx.merge(graphdef, params), nnx.merge(graphdef, grads))
    updates, opt_state = optimizer(lr, config).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), dict(loss=loss, accuracy=acc, **logs)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def train_chunk(state, start):
    """`every` steps of every run; the logs averaged over them, [R, ...] each."""
    def body(state, i):
      return jax.vmap(step, in_axes=(0, None, 0, 0))(state, start + i, lrs, keys[:, 1])
    state, logs = jax.lax.scan(body, state, jnp.arange(every))
    return state, jax.tree.map(lambda x: x.mean(0), logs)

  @jax.jit
  def evaluate(params):
    """Held-out accuracy [R]: eval_batches fresh batches of every run's held-out stream."""
    def one(p, key):
      def acc(i):
        tokens, targets = make_batch(jax.random.fold_in(key, i), task, batch)
        return cross_entropy(nnx.merge(graphdef, p)(tokens), targets)[1]
      return jax.lax.map(acc, jnp.arange(config["eval_batches"])).mean()
    return jax.vmap(one)(params, keys[:, 2])

  start = time.perf_counter()
  state = jax.jit(jax.vmap(init))(keys[:, 0], lrs)
  history: list[list[dict[str, Any]]] = [[] for _ in runs]
  for s in tqdm(range(0, steps, every), desc=desc, leave=False):
    state, logs = train_chunk(state, s)
    logs = jax.tree.map(np.asarray, logs)
    for r, h in enumerate(history):
      h.append(dict(step=s + every, **{k: v[r].tolist() for k, v in logs.items()}))
  accuracy = np.asarray(evaluate(state[0]))
  seconds = time.perf_counter() - start
  return [dict(variant=variant, seq_len=task.seq_len, pairs=task.pairs, lr=lr, seed=seed,
               accuracy=float(accuracy[r]), steps=steps, group_runs=len(runs),
               group_seconds=seconds, history=history[r])
          for r, (lr, seed) in enumerate(runs)]


# ------------------------------------------------------------ the sweep ----
def settings(config: Mapping[str, Any]) -> list[tuple[int, int]]:
  """(seq_len, pairs): every seq_len at base_pairs, then every pairs at base_seq_len."""
  cross = [(L, config["base_pairs"]) for L in config["seq_lens"]]
  cross += [(config["base_seq_len"], K) for K in config["pairs"]]
  return list(dict.fromkeys(cross))


def make_task(config: Mapping[str, Any], seq_len: int, pairs: int) -> Task:
  return Task(seq_len, pairs, config["segment"], config["num_keys"], config["num_values"],
              config["num_distractors"])


def run_path(root: pathlib.Path, variant: str, seq_len: int, pairs: int, lr: float,
             seed: int) -> pathlib.Path:
  return root / "runs" / variant / f"L{seq_len}_K{pairs}" / f"lr{lr:g}_seed{seed}.json"


def run(config: Mapping[str, Any], workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """Trains every (variant, setting, lr, seed) not yet on disk; returns the results rows.

  One "accuracy" row per (variant, seq_len, pairs), one value per seed: the
  held-out accuracy of that seed's best lr. Writes <workdir>/results_recall.md
  (tables) and <workdir>/recall.png; runs live in <workdir>/recall/runs/.
  """
  workdir = pathlib.Path(workdir)
  root = workdir / "recall"
  groups = [(v, L, K) for v in config["variants"] for L, K in settings(config)]
  runs = [(lr, seed) for lr in config["lrs"] for seed in config["seeds"]]
  best: dict[tuple[str, int, int], list[dict[str, Any]]] = {}  # per seed, its best-lr run
  for variant, L, K in tqdm(groups, desc="recall"):
    todo = [r for r in runs if not run_path(root, variant, L, K, *r).exists()]
    for res in (train_group(make_task(config, L, K), variant, config, todo,
                            desc=f"{variant} L={L} K={K}") if todo else []):
      path = run_path(root, variant, L, K, res["lr"], res["seed"])
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(json.dumps(res))
    done = [json.loads(run_path(root, variant, L, K, *r).read_text()) for r in runs]
    best[variant, L, K] = [max((d for d in done if d["seed"] == seed), key=lambda d: d["accuracy"])
                           for seed in config["seeds"]]
  rows = [report.row("recall", v, "accuracy", [b["accuracy"] for b in best[v, L, K]],
                     seq_len=L, pairs=K) for v, L, K in groups]
  (workdir / "results_recall.md").write_text("\n".join(markdown(rows, best, config)) + "\n")
  plot(rows, config, workdir / "recall.png")
  return rows


# ---------------------------------------------------------------- output ----
def _sweeps(config: Mapping[str, Any]) -> list[tuple[str, str, int, str, Sequence[int]]]:
  """(x key, fixed key, fixed value, title, x values) of the two sweeps of the cross."""
  return [("seq_len", "pairs", config["base_pairs"], f"pairs = {config['base_pairs']}",
           config["seq_lens"]),
          ("pairs", "seq_len", config["base_seq_len"], f"seq_len = {config['base_seq_len']}",
           config["pairs"])]


def markdown(rows: list[dict[str, Any]], best: Mapping[tuple[str, int, int], list[dict[str, Any]]],
             config: Mapping[str, Any]) -> list[str]:
  """Accuracy tables of both sweeps, each seed's best lr, and the base setting's diagnostics."""
  find = {(r["variant"], r["seq_len"], r["pairs"]): r for r in rows}
  variants = config["variants"]
  lines = [f"# ttt_jax.evaluate --task=recall, preset {config['preset']}", "",
           f"Held-out MQAR accuracy, mean ± 95 % t-interval over seeds {tuple(config['seeds'])}, "
           f"each seed at its best lr of {tuple(config['lrs'])}; chance = 1/{config['num_values']}"
           f" = {1 / config['num_values']:.3f}.", ""]
  for x, fixed, value, title, xs in _sweeps(config):
    key = lambda v, n: (v, n, value) if x == "seq_len" else (v, value, n)
    lines += [f"### accuracy vs {x} ({title})", ""]
    lines += report.markdown_table(["variant", *map(str, xs)],
                                   [[v, *(report.fmt(find[key(v, n)]) for n in xs)]
                                    for v in variants])
    lines += ["", f"best lr per seed, vs {x}:", ""]
    lines += report.markdown_table(
        ["variant", *map(str, xs)],
        [[v, *("/".join(f"{b['lr']:g}" for b in best[key(v, n)]) for n in xs)] for v in variants])
    lines.append("")
  L, K = config["base_seq_len"], config["base_pairs"]
  mean = lambda runs, f: np.mean([f(r) for r in runs], axis=0)
  per_block = lambda a: " / ".join(f"{x:.3g}" for x in np.atleast_1d(a))
  table = []
  for v in variants:
    runs = best[v, L, K]
    if "slot_grad_norm" not in runs[0]["history"][0]:
      table.append([v, "-", "-", "-", f"{runs[0]['group_seconds'] / 60:.1f}"])
      continue
    table.append([v, per_block(mean(runs, lambda r: np.mean([h["slot_grad_norm"]
                                                              for h in r["history"]], axis=0))),
                  per_block(mean(runs, lambda r: r["history"][-1]["gate_fwd"])),
                  per_block(mean(runs, lambda r: r["history"][-1]["gate_bwd"])),
                  f"{runs[0]['group_seconds'] / 60:.1f}"])
  lines += [f"### diagnostics at seq_len {L}, pairs {K} (best-lr runs, mean over seeds; "
            f"per block)", ""]
  lines += report.markdown_table(["variant", "slot core grad norm (mean over training)",
                                  "final mean abs tanh gate fwd", "bwd",
                                  "group train time (min)"], table)
  return lines


def plot(rows: list[dict[str, Any]], config: Mapping[str, Any], path: pathlib.Path) -> None:
  """Accuracy vs seq_len and vs pairs, one line per variant with its 95 % interval."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, (x, fixed, value, title, xs) in zip(axes, _sweeps(config)):
    for v in config["variants"]:
      sel = sorted((r for r in rows if r["variant"] == v and r[fixed] == value and r[x] in xs),
                   key=lambda r: r[x])
      mean = np.array([r["mean"] for r in sel])
      err = np.array([[r["mean"] - r["ci_low"], r["ci_high"] - r["mean"]]
                      if r["ci_low"] is not None else [0.0, 0.0] for r in sel]).T
      ax.errorbar([r[x] for r in sel], mean, yerr=err, marker="o", capsize=3, label=v)
    ax.axhline(1 / config["num_values"], color="grey", ls="--", lw=1, label="chance")
    ax.set(xscale="log", xlabel=x, ylabel="held-out accuracy", ylim=(-0.02, 1.02),
           title=f"MQAR, {title}")
    ax.set_xticks(list(xs), [str(n) for n in xs])
  axes[1].legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
