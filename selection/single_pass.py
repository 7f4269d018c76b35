"""One pass over the pool (docs/design.md#single-pass): the capture's backward also yields the training gradient.

FTW's capture runs one forward over the pool and one backward to the outputs of the modules it
records, which gives every sample's output gradient Δ_i at every recorded module. Samples do not
interact in a causal LM, so the gradient of the weighted loss Σ_i w_i ℓ_i at a module's output is
w_i Δ_i, and the gradient of each parameter follows from that module alone. For a linear layer that
is Σ_i w_i Δ_iᵀ A_i: the weight-gradient half of a backward, over the k chosen samples only, with no
second forward and no second activation backward.

Which modules: every module that directly owns a trainable parameter must be a "leaf" whose output is
affine in its parameters — ``nn.Linear``, transformers ``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm``
and ``*RMSNorm`` classes (peft's LoRA matrices are ``nn.Linear``). Their parameter gradients are then
the vector-Jacobian product at the recorded input, whatever the parameter's value, so a sharded
parameter (an engine's shard of it) never needs to be gathered: :meth:`PoolPass.local_grads`
computes full-shape gradients of this rank's samples with zero stand-ins for the parameters. A model
with any other trainable module is not eligible (:func:`single_pass_leaves` says why) and the trainer
keeps the two-pass step.

How an engine applies them is the engine's business (pipeline/engines/): a plain module takes
:meth:`PoolPass.accumulate_into_grads`; FSDP2 reduce-scatters the local full gradients into its
Shard(0) gradients; DeepSpeed runs its own backward on :meth:`PoolPass.surrogate_loss`, whose
gradient is the same (module calls on the recorded inputs of the chosen rows, so ZeRO-3 gathers,
reduce-scatters and checks overflow as in any backward).
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from optsel.selection.model_view import ModelView, model_view_for

_CONV1D: tuple[type, ...]  #: transformers' Conv1D (GPT-2 style linear with transposed weight), when importable
try:
    from transformers.pytorch_utils import Conv1D

    _CONV1D = (Conv1D,)
except ImportError:  # pragma: no cover - transformers is a hard dependency
    _CONV1D = ()

_AFFINE_TYPES: tuple[type, ...] = (nn.Linear, nn.Embedding, nn.LayerNorm) + _CONV1D


def _affine_in_params(module: nn.Module) -> bool:
    return isinstance(module, _AFFINE_TYPES) or type(module).__name__.endswith("RMSNorm")


@dataclass
class Leaf:
    """A module that directly owns trainable parameters. shapes: the full (unsharded) shapes."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    shapes: dict[str, tuple[int, ...]]


def single_pass_leaves(model: nn.Module, view: ModelView | None = None) -> tuple[list[Leaf], str]:
    """(leaves, "") when every trainable parameter belongs to an affine-in-parameters leaf module,
    else ([], the reason naming the first module that is not). view: gives full (unsharded) shapes
    (default: the view registered for ``model``)."""
    view = view or model_view_for(model)
    leaves: list[Leaf] = []
    owned: set[int] = set()
    for name, module in model.named_modules():
        direct = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not direct:
            continue
        if not _affine_in_params(module):
            return [], (
                f"module {name or '<root>'} ({type(module).__name__}) owns trainable parameters "
                f"{sorted(direct)} but is not one of Linear/Conv1D/Embedding/LayerNorm/*RMSNorm"
            )
        if any(id(p) in owned for p in direct.values()):  # a tied weight: both users record calls
            pass
        owned.update(id(p) for p in direct.values())
        shapes = {n: tuple(view.full_shape(p)) for n, p in direct.items()}
        leaves.append(Leaf(name, module, direct, shapes))
    if not leaves:
        return [], "the model has no trainable parameter"
    return leaves, ""


@dataclass
class LeafCall:
    """One call of a leaf in the capture forward: its input [c, ...] and output gradient [c, ...]
    (detached; row j is pass row ``rows[j]``: a pass may hold any rows, e.g. length-sorted ones)."""

    leaf: Leaf
    inputs: torch.Tensor
    grad_out: torch.Tensor
    rows: torch.Tensor


@dataclass
class PoolPass:
    """What the capture pass keeps for the training gradient: every leaf call of every chunk, the
    per-sample losses [n] (float32, the token-mean CE the training objective weights) and the
    per-sample label counts [n] (0: an empty sample). row_map [n_pool]: when the pass covered only
    some of the pool's rows (two-stage FTW's survivors), pool row → pass row (−1: not in the pass);
    every method here takes pool rows."""

    calls: list[LeafCall] = field(default_factory=list)
    loss: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    row_map: torch.Tensor | None = None

    def pass_rows(self, rows: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The pass rows of pool ``rows`` [s]. A row outside the pass may only carry weight 0 (the
        trainer's keep-in-step row): it maps to pass row 0; with a non-zero weight it is an error."""
        if self.row_map is None:
            return rows
        mapped = self.row_map[rows.cpu()]
        outside = mapped < 0
        if bool((outside & (weights.cpu() != 0)).any()):
            raise ValueError(f"rows: pool rows {rows.cpu()[outside].tolist()} are not in this pass (not survivors)")
        return mapped.clamp(min=0).to(rows.device)

    def _weighted(
        self, call: LeafCall, rows: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(inputs, weight-scaled output gradients) of the chosen rows inside this call's chunk."""
        rows, weights = rows.cpu(), weights.cpu()
        match = rows[:, None] == call.rows.cpu()[None, :]  # [s, c]: chosen row i is the call's row j
        inside = match.any(1)
        if not bool(inside.any()):
            return None
        local = match[inside].to(torch.int64).argmax(1).to(call.inputs.device)
        w = weights[inside].to(call.grad_out.device, call.grad_out.dtype)
        scaled = call.grad_out[local] * w.view(-1, *([1] * (call.grad_out.dim() - 1)))
        return call.inputs[local], scaled

    def local_grads(
        self, rows: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype | None = None
    ) -> dict[nn.Parameter, torch.Tensor]:
        """Σ_{i in rows} w_i ∇ℓ_i for every trainable parameter, full shape, in ``dtype`` (None: the
        parameter's own). rows [s] int64 (pool rows), weights [s]."""
        rows = self.pass_rows(rows, weights)
        out: dict[nn.Parameter, torch.Tensor] = {}
        for leaf in _unique_leaves(self.calls):
            for pname, p in leaf.params.items():
                out[p] = torch.zeros(leaf.shapes[pname], dtype=dtype or p.dtype, device=self.calls[0].grad_out.device)
        for call in self.calls:
            picked = self._weighted(call, rows, weights)
            if picked is None:
                continue
            for p, g in _leaf_vjp(call.leaf, *picked).items():
                out[p] += g.to(dtype)
        return out

    @torch.no_grad()
    def accumulate_into_grads(self, rows: torch.Tensor, weights: torch.Tensor, scale: float = 1.0) -> None:
        """``p.grad += scale · Σ w_i ∇ℓ_i`` for a plain (unsharded, single-process) module."""
        for p, g in self.local_grads(rows, weights).items():
            g = scale * g
            p.grad = g if p.grad is None else p.grad + g

    def surrogate_loss(self, rows: torch.Tensor, weights: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """A scalar whose parameter gradient is ``scale · Σ w_i ∇ℓ_i`` (and whose value means nothing):
        Σ over leaf calls of ⟨scale · w ⊙ Δ, module(input)⟩ on the chosen rows, through the real
        module calls (an engine's hooks gather and reduce as in its own backward)."""
        rows = self.pass_rows(rows, weights)
        total = None
        for call in self.calls:
            picked = self._weighted(call, rows, weights)
            if picked is None:
                continue
            inputs, scaled = picked
            term = (call.leaf.module(inputs).float() * (scale * scaled).float()).sum()
            total = term if total is None else total + term
        if total is None:
            raise ValueError("rows: no chosen row in this pass (give one row with weight 0 to keep ranks in step)")
        return total


def _unique_leaves(calls: list[LeafCall]) -> list[Leaf]:
    seen: dict[int, Leaf] = {}
    for call in calls:
        seen.setdefault(id(call.leaf), call.leaf)
    return list(seen.values())


def _leaf_vjp(leaf: Leaf, inputs: torch.Tensor, cotangent: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """∂⟨cotangent, leaf(inputs)⟩/∂θ for the leaf's parameters (full shapes)."""
    module = leaf.module
    if isinstance(module, (nn.Linear, *_CONV1D)):
        a = inputs.reshape(-1, inputs.shape[-1]).to(cotangent.dtype)
        d = cotangent.reshape(-1, cotangent.shape[-1])
        out = {}
        for pname, p in leaf.params.items():
            if pname == "weight":
                out[p] = a.T @ d if not isinstance(module, nn.Linear) else d.T @ a
            elif pname == "bias":
                out[p] = d.sum(0)
        return out
    # Embedding / norms: the VJP of a hook-free copy whose parameters are zero stand-ins
    # (exact for modules affine in their parameters; see the module docstring)
    stand_ins = {
        n: torch.zeros(leaf.shapes[n], dtype=cotangent.dtype, device=cotangent.device, requires_grad=True)
        for n in leaf.params
    }
    clone = copy.copy(module)
    # plain tensors in the clone's parameter slots (Module's annotation says Parameter)
    clone._parameters = cast(
        "OrderedDict[str, nn.Parameter | None]",
        OrderedDict((n, stand_ins.get(n, v)) for n, v in module._parameters.items()),
    )
    for hooks in (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_backward_hooks",
        "_backward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks_always_called",
    ):
        if hasattr(clone, hooks):
            setattr(clone, hooks, OrderedDict())
    x = inputs if not inputs.is_floating_point() else inputs.to(cotangent.dtype)
    with torch.enable_grad():
        y = clone(x)
        grads = torch.autograd.grad(y, list(stand_ins.values()), grad_outputs=cotangent.to(y.dtype), allow_unused=True)
    return {leaf.params[n]: (torch.zeros_like(s) if g is None else g) for (n, s), g in zip(stand_ins.items(), grads)}
