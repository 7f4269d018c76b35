"""The diagonal Adam preconditioner P = 1/(sqrt(v̂)+ε) and momentum m̂ = m/(1−β1^t) (docs/design.md#utility-filter-qp).

All reads of optimizer state go through ONE seam, :class:`OptimizerStateReader`: for a covered
parameter it returns :class:`ParamState` — the optimizer's own β1, β2, ε, step, bias-correction flag
and a list of :class:`StateBlock` (rectangular blocks [rows, cols] of exp_avg / exp_avg_sq in the
parameter's own layout). The plain reader returns one block covering the whole tensor; a sharded
reader (each engine's own, in pipeline/engines/, handed out by the engine's model view:
selection/model_view.py) returns only this rank's blocks — a row block for FSDP2's ``Shard(0)``, up
to three blocks for ZeRO-3's flat slice (a partial first row, whole rows, a partial last row). Everything downstream (alignment,
exact Gram, rank-one factors) works per block and sums partials, so a sharded run all-reduces
small results and never gathers a whole moment tensor.

Layer convention: blocks are turned into :class:`LayerBlock` over the layer's [d_out, d_in] weight
matrix (Conv1D's transposed storage is flipped here), so rows are output dims (columns of Δ) and
columns are input dims (columns of A).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from optsel import distributed
from optsel.selection.layers import CoveredLayer

#: optimizer classes whose state is Adam's (exp_avg, exp_avg_sq, step; groups with betas, eps); an
#: engine adds its own fused / offloaded Adam classes with :func:`register_adam_like`
ADAM_CLASS_NAMES: list[str] = ["Adam", "AdamW"]


def register_adam_like(*class_names: str) -> None:
    """Declare optimizer classes (by class name, anywhere in the MRO) whose state is Adam's."""
    for name in class_names:
        if name not in ADAM_CLASS_NAMES:
            ADAM_CLASS_NAMES.append(name)


@dataclass(frozen=True)
class AdamHyper:
    """The optimizer's own hyper-parameters for one parameter; step = updates taken so far (0: none)."""

    step: int
    beta1: float
    beta2: float
    eps: float
    bias_correction: bool = True


@dataclass
class StateBlock:
    """Block [rows, cols] of a parameter's moments, in the parameter's own 2-D layout.
    exp_avg / exp_avg_sq: [r, c] or None before the first step."""

    rows: slice
    cols: slice
    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor | None


@dataclass
class ParamState:
    hyper: AdamHyper
    blocks: list[StateBlock]


class OptimizerStateReader(abc.ABC):
    """The one place that reads optimizer state (see module docstring).

    ``replicated``: every rank holds the same, whole state (plain DDP / one process); block partials
    are then complete on each rank and must not be summed over ranks. Sharded readers set False:
    their blocks are disjoint over ranks and partial results are all-reduced.
    """

    replicated: bool = True

    @abc.abstractmethod
    def read(self, param: torch.nn.Parameter) -> ParamState:
        """This rank's blocks of ``param``'s Adam moments and the hyper-parameters that apply."""

    def gather_full(
        self,
        param: torch.nn.Parameter,
        pieces: Sequence[tuple[slice, slice, torch.Tensor]],
        shape: tuple[int, int],
        dtype: torch.dtype,
        wire: torch.dtype,
        comm: distributed.CommCounter | None = None,
    ) -> torch.Tensor:
        """The whole [d0, d1] matrix in ``param``'s own 2-D layout whose values on this rank's blocks are
        ``pieces`` ((rows, cols, value [r, c]) as :meth:`read` hands the blocks out), in ``dtype``.
        A replicated reader holds the whole matrix already; a sharded one gathers it the way its engine
        shards the weight, ``wire`` being the dtype that crosses ranks. Collective for sharded readers."""
        if not self.replicated:
            raise TypeError(
                f"{type(self).__name__}: no gather of a parameter-shaped matrix (exchange='direction' needs one)"
            )
        full = torch.zeros(shape, dtype=dtype, device=param.device)
        for rows, cols, value in pieces:
            full[rows, cols] = value.to(dtype)
        return full


def _full(shape: tuple[int, ...]) -> tuple[slice, slice]:
    return slice(0, shape[0]), slice(0, shape[1])


class TorchAdamStateReader(OptimizerStateReader):
    """Unsharded torch.optim.Adam / AdamW (amsgrad: max_exp_avg_sq) and the classes an engine
    registered with :func:`register_adam_like`; refuses sharded parameters or moments."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not is_adam_like(optimizer):
            raise TypeError(unsupported_message(optimizer))
        self.optimizer = optimizer
        self._groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}

    def _group(self, param: torch.nn.Parameter, hint: str = "") -> dict:
        """The param group holding ``param`` (KeyError, with ``hint``, if the optimizer does not manage it)."""
        group = self._groups.get(id(param))
        if group is None:
            raise KeyError("parameter is not managed by the optimizer" + hint)
        return group

    def read(self, param: torch.nn.Parameter) -> ParamState:
        group = self._group(param)
        if type(param.data) is not torch.Tensor or param.numel() == 0:
            raise TypeError(
                f"optimizer: a parameter of shape {tuple(param.shape)} ({type(param.data).__name__}) "
                f"looks sharded; the plain reader needs whole tensors. Sharded engines register a model "
                f"view (optsel.selection.model_view.register_model_view) that reads their shards"
            )
        state = self.optimizer.state.get(param, {})
        hyper = adam_hyper(group, state)
        rows, cols = _full(shape_2d(param.shape))
        if hyper.step == 0 or "exp_avg" not in state:
            return ParamState(hyper, [StateBlock(rows, cols, None, None)])
        m, v = state["exp_avg"], second_moment(group, state)
        if m.numel() != param.numel() or v.numel() != param.numel():
            raise TypeError(
                f"optimizer: moments of {m.numel()} / {v.numel()} elements for a parameter of "
                f"{param.numel()}: the optimizer state is sharded; use the engine's model view"
            )
        return ParamState(hyper, [StateBlock(rows, cols, _as_2d(m), _as_2d(v))])


def adam_hyper(group: dict, state: dict) -> AdamHyper:
    """β1, β2, ε, step and bias correction of one Adam param group / state entry (step 0: no state)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    step = state.get("step", group.get("step", 0) if state else 0)
    step = int(step.item()) if torch.is_tensor(step) else int(step)
    if "exp_avg" not in state:
        step = 0
    return AdamHyper(
        step=step,
        beta1=beta1,
        beta2=beta2,
        eps=float(group["eps"]),
        bias_correction=bool(group.get("bias_correction", True)),
    )


def second_moment(group: dict, state: dict) -> torch.Tensor:
    """exp_avg_sq, or max_exp_avg_sq under amsgrad (what Adam divides by)."""
    if group.get("amsgrad") and "max_exp_avg_sq" in state:
        return state["max_exp_avg_sq"]
    return state["exp_avg_sq"]


class IdentityStateReader(OptimizerStateReader):
    """geometry="sgd": P = I, no momentum, whatever the optimizer (one full block of the parameter's
    full shape, which ``full_shape`` gives: a sharded engine's model view knows it)."""

    def __init__(self, full_shape: Callable[[torch.Tensor], Sequence[int]] = lambda p: tuple(p.shape)):
        self.full_shape = full_shape

    def read(self, param: torch.nn.Parameter) -> ParamState:
        rows, cols = _full(shape_2d(self.full_shape(param)))
        return ParamState(AdamHyper(0, 0.0, 0.0, 0.0), [StateBlock(rows, cols, None, None)])


def is_adam_like(optimizer: object) -> bool:
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return True
    return any(cls.__name__ in ADAM_CLASS_NAMES for cls in type(optimizer).__mro__)


def unsupported_message(optimizer: object) -> str:
    return (
        f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__} is not supported by "
        f"geometry='adam' (supported: {', '.join(ADAM_CLASS_NAMES)}); use geometry='sgd' for P = I"
    )


def shape_2d(shape: Sequence[int]) -> torch.Size:
    """A parameter's full shape as 2-D [d0, rest]."""
    rest = 1
    for d in shape[1:]:
        rest *= int(d)
    return torch.Size((int(shape[0]), rest))


def _as_2d(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


@dataclass
class LayerBlock:
    """Block [rows, cols] of a layer's [d_out, d_in] matrix: P and m̂ there ([r, c]; m̂ None = 0)."""

    rows: slice
    cols: slice
    precond: torch.Tensor
    momentum: torch.Tensor | None


def empty_block(dtype: torch.dtype, device: torch.device) -> LayerBlock:
    """A block with no rows and no columns (a rank that holds none of a layer): P [0, 0], no momentum."""
    return LayerBlock(slice(0, 0), slice(0, 0), torch.zeros(0, 0, dtype=dtype, device=device), None)


@dataclass
class LayerGeometry:
    blocks: list[LayerBlock]
    hyper: AdamHyper
    identity: bool  # True when P = I (sgd geometry or no optimizer state yet)
    muon: object | None = None  # a Muon parameter's MuonLayerGeometry (selection/muon_geometry.py), set per step


def layer_geometry(
    reader: OptimizerStateReader, layer: CoveredLayer, dtype: torch.dtype, use_momentum: bool = True
) -> LayerGeometry:
    """P and m̂ on this rank's non-empty blocks of ``layer`` (layer convention, ``dtype``); the list
    is empty where a sharded rank holds none of the parameter."""
    state = reader.read(layer.param)
    h = state.hyper
    blocks: list[LayerBlock] = []
    identity = True
    for blk in state.blocks:
        rows, cols = (blk.cols, blk.rows) if layer.transposed else (blk.rows, blk.cols)
        shape = (rows.stop - rows.start, cols.stop - cols.start)
        if shape[0] * shape[1] == 0:  # a sharded reader may hand out nothing for this rank
            continue
        if blk.exp_avg_sq is None or h.step == 0:
            blocks.append(LayerBlock(rows, cols, torch.ones(shape, dtype=dtype, device=layer.param.device), None))
            continue
        identity = False
        v = blk.exp_avg_sq.detach().to(dtype)
        m = blk.exp_avg.detach().to(dtype) if blk.exp_avg is not None else None
        if h.bias_correction:
            v = v / (1.0 - h.beta2**h.step)
            m = m / (1.0 - h.beta1**h.step) if m is not None else None
        precond = 1.0 / (v.sqrt() + h.eps)
        if layer.transposed:
            precond, m = precond.T, (m.T if m is not None else None)
        blocks.append(
            LayerBlock(rows, cols, precond.contiguous(), m.contiguous() if (m is not None and use_momentum) else None)
        )
    if not blocks:  # this rank holds none of it: identity as far as the hyper-parameters say
        identity = h.step == 0
    return LayerGeometry(blocks, h, identity)


def default_coefficients(step: int, beta1: float, gamma: float = 1.0) -> tuple[float, float]:
    """(ρ, τ) of docs/design.md#utility-filter-qp at optimizer step t = ``step`` (updates taken so far):
    ρ = γ β1 (1 − β1^t)/(1 − β1^{t+1}),  τ = γ (1 − β1)/(1 − β1^{t+1})."""
    denom = 1.0 - beta1 ** (step + 1)
    if denom <= 0.0:  # beta1 == 0 and ... only when beta1 == 1 (invalid): keep τ = γ
        return 0.0, gamma
    return gamma * beta1 * (1.0 - beta1**step) / denom, gamma * (1.0 - beta1) / denom
