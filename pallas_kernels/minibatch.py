"""One TTT mini-batch inside a kernel, in token tiles: forward and backward.

The step W_b = W_{b-1} - sum_j eta_j grad l_j(W_{b-1}), z_j = f(q_j; W_b)
is a sum of per-token terms followed by a per-token read-out, so a kernel can
cut a mini-batch of K tokens into T tiles of Kt = K / T tokens and hold only
one tile's intermediates at a time ("large-chunk" TTT with K in the
thousands needs this on every accelerator). Both the TPU and the GPU kernels
run the functions below; they differ only in how tiles are read and written
(`Tiles.index`: the backend's layout) and in how the tile loop is
emitted (a Python loop of static slices on TPU, a `fori_loop` on GPU).

Backward of one mini-batch, given its starting weights W_{b-1} and the
cotangent dW_b of the weights after it:
  1. W_b = W_{b-1} - sum over tiles of the update (recomputed);
  2. read-out VJP tile by tile at W_b: dq of each tile, and dW_b accumulated;
  3. update VJP tile by tile at W_{b-1} with cotangent -dW_b: dk, dv, deta of
     each tile; dW_{b-1} = dW_b + the sum over tiles.
With one tile, the update's VJP from step 1 is reused in step 3 (no second
update pass). Every VJP is `jax.vjp` of the op's own update / read-out.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from pallas_kernels.common import F32, InnerModel

Array = jax.Array
Weights = tuple[Array, ...]


class Tiles(abc.ABC):
  """One mini-batch's token tiles (t in range(T)), read from and written to
  the kernel's refs. A backend says only where tile t lives (`index`) and
  how the tile loop is emitted (`loop`).

  tok_refs: (q, k, v, eta, ln_weight, ln_bias) refs; z_ref (forward) or
  grad_refs = (dz, dq, dk, dv, deta) refs (backward) for the outputs.
  """

  def __init__(self, tok_refs, T: int, z_ref=None, grad_refs=()):
    self.q, self.k, self.v, self.eta, lnw_ref, lnb_ref = tok_refs
    self.T = T
    self.ln = (lnw_ref[...], lnb_ref[...])  # [1, d] each
    self.out = {"z": z_ref, **dict(zip(("dz", "dq", "dk", "dv", "deta"), grad_refs))}

  @abc.abstractmethod
  def index(self, t, eta: bool = False) -> Any:
    """The ref index of tile t in the token refs (eta: in the eta refs)."""

  @abc.abstractmethod
  def loop(self, body: Callable[[Any, Any], Any], carry: Any) -> Any:
    """carry = body(t, carry) for t in range(T)."""

  def keys(self, t) -> tuple[Array, Array, Array]:
    """(xk, xv, eta) of tile t, fp32; eta in the layout `Step.update` takes."""
    i = self.index(t)
    return self.k[i].astype(F32), self.v[i].astype(F32), self.eta[self.index(t, eta=True)]

  def query(self, t) -> Array:
    """xq [Kt, d] of tile t, fp32."""
    return self.q[self.index(t)].astype(F32)

  def dz(self, t) -> Array:
    """The cotangent of z for tile t, fp32."""
    return self.out["dz"][self.index(t)].astype(F32)

  def _write(self, name: str, t, x: Array, eta: bool = False) -> None:
    ref = self.out[name]
    ref[self.index(t, eta)] = x.astype(ref.dtype)

  def write_z(self, t, z: Array) -> None:
    self._write("z", t, z)

  def write_dq(self, t, dq: Array) -> None:
    self._write("dq", t, dq)

  def write_dkv(self, t, dk: Array, dv: Array, deta: Array) -> None:
    self._write("dk", t, dk)
    self._write("dv", t, dv)
    self._write("deta", t, deta, eta=True)


def _add(xs, ys):
  return tuple(x + y for x, y in zip(xs, ys))


@dataclasses.dataclass(frozen=True)
class Step:
  """The inner model's update and read-out as a kernel calls them.

  `update`/`readout` run forward-only passes; `update_vjp`/`readout_vjp` are
  the same functions built for `jax.vjp` (their matmul may carry a custom
  VJP, which not every Pallas backend lowers outside autodiff). Signatures:
  update(weights, xk, xv, eta, ln_w, ln_b), readout(weights, xq, ln_w, ln_b).
  """
  update: Callable[..., Weights]
  readout: Callable[..., Array]
  update_vjp: Callable[..., Weights]
  readout_vjp: Callable[..., Array]

  @classmethod
  def make(cls, model: InnerModel, *, mm: Callable, mm_vjp: Callable, eps: float,
           eta_column: Callable[[Array], Array] = lambda e: e) -> "Step":
    """eta_column maps the eta the kernel's tiles hold to the [Kt, 1] column
    the update scales its rows by (identity when the tiles hold a column)."""
    def update(mm_):
      def fn(weights, xk, xv, eta, ln_w, ln_b):
        return model.update(weights, xk, xv, eta_column(eta), ln_w, ln_b, eps=eps, mm=mm_)
      return fn

    readout = lambda mm_: functools.partial(model.readout, eps=eps, mm=mm_)
    return cls(update(mm), readout(mm), update(mm_vjp), readout(mm_vjp))


def updated(step: Step, tiles: Tiles, weights: Weights) -> Weights:
  """W_b = W_{b-1} - the sum of the mini-batch's tile updates."""
  def add_tile(t, acc):
    return _add(acc, step.update(weights, *tiles.keys(t), *tiles.ln))

  grads = tiles.loop(add_tile, tuple(jnp.zeros_like(w) for w in weights))
  return tuple(w - g for w, g in zip(weights, grads))


def forward(step: Step, tiles: Tiles, weights: Weights) -> Weights:
  """One mini-batch: writes z tile by tile, returns W_b."""
  new = updated(step, tiles, weights)

  def read_out(t, carry):
    tiles.write_z(t, step.readout(new, tiles.query(t), *tiles.ln))
    return carry

  tiles.loop(read_out, None)
  return new


def backward(step: Step, tiles: Tiles, start: Weights, dnew: Weights,
             dln: tuple[Array, Array]) -> tuple[Weights, tuple[Array, Array]]:
  """One mini-batch in reverse (see module docstring): writes dq, dk, dv and
  deta tile by tile; returns dW_{b-1} and dln plus this mini-batch's share."""
  if tiles.T == 1:
    grads, update_vjp = jax.vjp(step.update_vjp, start, *tiles.keys(0), *tiles.ln)
    new = tuple(w - g for w, g in zip(start, grads))
  else:
    new = updated(step, tiles, start)

  def readout_tile(t, acc):
    dw, dln_acc = acc
    _, vjp = jax.vjp(step.readout_vjp, new, tiles.query(t), *tiles.ln)
    dw_t, dq, dlnw, dlnb = vjp(tiles.dz(t))
    tiles.write_dq(t, dq)
    return _add(dw, dw_t), _add(dln_acc, (dlnw, dlnb))

  dnew, dln = tiles.loop(readout_tile, (dnew, dln))
  neg = tuple(-x for x in dnew)  # W_b = W_{b-1} - sum_t update_t(W_{b-1})

  def update_tile(t, acc):
    dw, dln_acc = acc
    if tiles.T == 1:
      vjp = update_vjp
    else:
      _, vjp = jax.vjp(step.update_vjp, start, *tiles.keys(t), *tiles.ln)
    dw_t, dk, dv, deta, dlnw, dlnb = vjp(neg)
    tiles.write_dkv(t, dk, dv, deta)
    return _add(dw, dw_t), _add(dln_acc, (dlnw, dlnb))

  return tiles.loop(update_tile, (dnew, dln))
