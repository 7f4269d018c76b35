"""The Muon geometry: FTW's b and K for parameters that ``torch.optim.Muon`` updates (docs/design.md#muon-geometry).

torch 2.13's Muon (``torch/optim/_muon.py``) updates a 2-D parameter θ with gradient g as

    B ← μB + (1−μ)g;   X = μ²B_old + (1−μ²)g (nesterov) | μB_old + (1−μ)g;   θ ← (1−ηλ)θ − η a NS(X)

(NS: ``ns_steps`` quintic Newton–Schulz steps with ``ns_coefficients`` after X/max(‖X‖_F, eps), on
the transpose when rows > cols; a = ``adjust_lr_fn``'s ratio: √max(1, rows/cols) ("original", the
default) or 0.2·√max(rows, cols) ("match_rms_adamw")). Write X = X₀ + c g with X₀ = αB_old the
momentum in flight ((α, c) = (μ², 1−μ²) or (μ, 1−μ)). Linearised at X₀, a batch gradient G w moves the
update per unit of the reference learning rate by J (G w) with

    J = r a c · J_NS(X₀),   u₀ = r a NS(X₀)   (r = η / η_ref: the group's lr over the reference lr)

and the curvature model under which Muon's zero-gradient step is a Newton step for its input,
H = (γ s/η_ref) I with s = ⟨X₀, u₀⟩/‖u₀‖², gives (divided by c' = τ/γ, so the layer adds to the same
``bᵀw − (τ/2) wᵀKw`` as the Adam layers)

    b_i = ⟨J g_i, g_V − ρ_μ u₀⟩ / c' = ⟨g_i, M⟩,  M = Jᵀ(g_V − ρ_μ u₀)/c'   (ρ_μ = γ s, or momentum_coef·s)
    K_ij = ⟨Ĵ g_i, Ĵ g_j⟩,  Ĵ = (√s / c') J.

M is one vector–Jacobian product through the NS iteration per layer and step (``torch.func.vjp``): a
parameter-shaped target direction like Adam's, so the factorised b_i = Σ_t δ_tᵀ M a_t and the
direction exchange apply unchanged. K needs Ĵ g_i per sample: each candidate's [d_out, d_in] gradient
is formed (in chunks) and pushed through one Jacobian–vector product (:func:`newton_schulz_jvp`, batched
over samples, the primal iterates shared), ≈ 2× the NS forward per sample and layer —
ns_steps·(6p²q + 4p³) FLOPs for a p×q matrix (p ≤ q), for every candidate (diag K) and every survivor (K).
Exact; no sketch or rank-one form.

NS runs here in the compute dtype (float64 / float32), not in the bfloat16 torch's Muon casts to:
the map and its Jacobian are exact for the optimizer's formula; the optimizer's own update carries
its bf16 rounding on top (tests/unit/test_muon_geometry.py checks both).

The quality grid's controls (``muon_model``; the default "jacobian" is the above):

- "lowrank" (OPUS-style, arXiv 2602.05400): J replaced by the fixed linear map S/‖X₀‖ with S = aI + bA + cA²,
  A = Y₀Y₀ᵀ, Y₀ = X₀/‖X₀‖ (in NS's wide orientation, (a, b, c) = ``ns_coefficients``): the first quintic step
  with its Gram frozen at the momentum, no normalisation term, one step instead of ``ns_steps``. Same ρ_μ, s
  and c'; S symmetric, so M = S(g_V − ρ_μ u₀)·r a c/(‖X₀‖ c'). p²q FLOPs per candidate and layer.
- "adam" (the wrong geometry): the layer read as if AdamW ran it — P = 1/(√v̂ + ε) from an EMA v of the
  squared gradients that :class:`HybridStateReader` keeps itself (a step pre-hook on the Muon optimizer sees
  each step's gradient; β2, ε: the first AdamW group's), m̂ = B/(1 − μ^t) (Muon's momentum_buffer is Adam's
  exp_avg with β1 = μ). The Adam machinery then runs unchanged (any Gram backend). Not checkpointed: after a
  resume the EMA restarts (P = I until the next step); plain (unsharded) tensors only.
- "identity": P = I, no momentum on the Muon layers (b_i = ⟨g_i, g_V⟩, K_ij = ⟨g_i, g_j⟩).

Degenerate linearisation: before the first step (no ``momentum_buffer``), with μ = 0, or with
‖X₀‖_F ≤ eps (NS's clamp), X₀ carries no direction and J_NS(X₀) is undefined. Such a layer falls back
to the gradient-only geometry P = I (b_i = ⟨g_i, g_V⟩, K_ij = ⟨g_i, g_j⟩), counted as the
``muon_degenerate`` fallback. Early steps with a small but non-zero B are linearised as above: the
model is then less accurate (c g is as large as X₀), not undefined.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from optsel.selection.layers import CoveredLayer
from optsel.selection.preconditioner import (
    AdamHyper,
    LayerGeometry,
    OptimizerStateReader,
    ParamState,
    StateBlock,
    TorchAdamStateReader,
    is_adam_like,
    shape_2d,
)

if TYPE_CHECKING:  # annotations only: ftw_config reads this module's names when it checks options
    from optsel.selection.ftw_config import FTWConfig

#: optimizer classes (by class name, anywhere in the MRO) whose 2-D parameters follow torch.optim.Muon's update
MUON_CLASS_NAMES: list[str] = ["Muon"]


def is_muon(optimizer: object) -> bool:
    return any(cls.__name__ in MUON_CLASS_NAMES for cls in type(optimizer).__mro__)


def optimizers_of(optimizer: Any) -> list[Any]:
    """The torch optimizers behind ``optimizer``: itself, a list/tuple of optimizers, or an object with
    an ``optimizers`` attribute (the hybrid Muon + AdamW of pipeline/engines/shared.py)."""
    if isinstance(optimizer, (list, tuple)):
        return list(optimizer)
    inner = getattr(optimizer, "optimizers", None)
    if isinstance(inner, (list, tuple)):
        return list(inner)
    return [optimizer]


@dataclass(frozen=True)
class MuonHyper:
    """One Muon param group's hyper-parameters (torch.optim.Muon's keys)."""

    lr: float
    momentum: float
    nesterov: bool
    ns_coefficients: tuple[float, float, float]
    ns_steps: int
    eps: float
    adjust_lr_fn: str | None

    @staticmethod
    def of(group: dict) -> MuonHyper:
        lr = group["lr"]
        a, b, c = (float(x) for x in group["ns_coefficients"])  # torch.optim.Muon's: three floats
        return MuonHyper(
            lr=float(lr.item() if torch.is_tensor(lr) else lr),
            momentum=float(group["momentum"]),
            nesterov=bool(group["nesterov"]),
            ns_coefficients=(a, b, c),
            ns_steps=int(group["ns_steps"]),
            eps=float(group["eps"]),
            adjust_lr_fn=group.get("adjust_lr_fn"),
        )

    def mix(self) -> tuple[float, float]:
        """(α, c): NS's input is α B_old + c g."""
        mu = self.momentum
        return (mu * mu, 1.0 - mu * mu) if self.nesterov else (mu, 1.0 - mu)


def adjust_ratio(adjust_lr_fn: str | None, shape: Sequence[int]) -> float:
    """Muon's learning-rate ratio for a parameter of ``shape`` (torch.optim._muon._adjust_lr(1, ...))."""
    from torch.optim._muon import _adjust_lr  # optional: torch.optim.Muon's module exists from torch 2.9 only  # noqa: PLC0415 - optional: torch >= 2.9 only

    return float(_adjust_lr(1.0, adjust_lr_fn, torch.Size(shape)))


def newton_schulz(X: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float) -> torch.Tensor:
    """torch.optim._muon._zeropower_via_newtonschulz in X's own dtype (no bfloat16 cast), [p, q] → [p, q]."""
    a, b, c = coefficients
    tall = X.shape[0] > X.shape[1]
    Y = X.T if tall else X
    Y = Y / Y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = Y @ Y.T
        Y = a * Y + (b * gram + c * gram @ gram) @ Y
    return Y.T if tall else Y


def newton_schulz_jvp(
    X: torch.Tensor, dX: torch.Tensor, coefficients: Sequence[float], steps: int, eps: float
) -> torch.Tensor:
    """J_NS(X)[dX] for a batch of tangents dX [n, p, q] at one point X [p, q] (‖X‖_F > eps): the forward-mode
    derivative of :func:`newton_schulz`, written out so the primal iterates Y_k and YYᵀ are formed once and
    each tangent costs 5 batched GEMMs per step (torch.func.jvp under vmap gives the same; tests check it)."""
    a, b, c = coefficients
    tall = X.shape[0] > X.shape[1]
    Y, dY = (X.T, dX.transpose(1, 2)) if tall else (X, dX)
    norm = Y.norm()
    dY = dY / norm - Y * ((dY * Y).sum(dim=(1, 2)) / norm**3)[:, None, None]
    Y = Y / norm
    for _ in range(steps):
        gram = Y @ Y.T
        poly = b * gram + c * gram @ gram
        dgram = dY @ Y.T
        dgram = dgram + dgram.transpose(1, 2)
        dpoly = b * dgram + c * (dgram @ gram + gram @ dgram)
        dY = a * dY + dpoly @ Y + poly @ dY
        Y = a * Y + poly @ Y
    return dY.transpose(1, 2) if tall else dY


@dataclass
class MuonLayerGeometry:
    """One Muon layer's linearisation (module docstring), all in the layer convention [d_out, d_in]
    except ``X0`` (the parameter's own layout, where NS acts).

    X0: αB_old; scale: r·a·c; u0: r·a·NS(X0); s: the curvature scale; inv_c: 1/c'; degenerate: the
    P = I fallback applies (X0 undefined as a direction)."""

    layer: CoveredLayer
    hyper: MuonHyper
    X0: torch.Tensor | None
    scale: float
    u0: torch.Tensor | None
    s: float
    inv_c: float
    degenerate: bool
    model: str = "jacobian"  #: "jacobian" | "lowrank" (module docstring)
    S: torch.Tensor | None = None  #: lowrank: S/‖X₀‖ [p, p] in NS's wide orientation

    def _point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X0, u0): both are set whenever the layer is not ``degenerate`` (:func:`muon_layer_geometry`)."""
        if self.X0 is None or self.u0 is None:
            raise ValueError(f"geometry: Muon layer {self.layer.name} has no X0 (degenerate): P = I applies")
        return self.X0, self.u0

    def _lowrank(self, G: torch.Tensor) -> torch.Tensor:
        """(S/‖X₀‖) G for G [..., rows, cols] in the parameter's layout (S acts on NS's short side)."""
        X0, _ = self._point()
        if self.S is None:
            raise ValueError(f"geometry: Muon layer {self.layer.name} has no S (model {self.model!r}, not lowrank)")
        return G @ self.S if X0.shape[0] > X0.shape[1] else self.S @ G

    def _ns(self) -> Callable[[torch.Tensor], torch.Tensor]:
        h = self.hyper
        return lambda X: newton_schulz(X, h.ns_coefficients, h.ns_steps, h.eps)

    def _to_param(self, G: torch.Tensor) -> torch.Tensor:
        return G.transpose(-1, -2) if self.layer.transposed else G

    def direction(self, target: torch.Tensor, rho_scale: float) -> torch.Tensor:
        """M = Jᵀ(g_V − ρ_μ u₀)/c' [d_out, d_in] for the target gradient block ``target`` (the whole
        layer), ρ_μ = ``rho_scale``·s: one vjp through NS."""
        if self.degenerate:
            return target.clone()
        X0, u0 = self._point()
        d = target - (rho_scale * self.s) * u0
        if self.model == "lowrank":  # S is symmetric: Jᵀ = J
            return self._to_param(self._lowrank(self._to_param(d.to(X0.dtype)))) * (self.scale * self.inv_c)
        vjp = torch.func.vjp(self._ns(), X0)[1]  # (output, vjp_fn): no has_aux
        (grad,) = vjp(self._to_param(d.to(X0.dtype)))
        return self._to_param(grad) * (self.scale * self.inv_c)

    def apply(self, G: torch.Tensor) -> torch.Tensor:
        """Ĵ G for a batch of gradients G [n, d_out, d_in] (layer convention) → [n, d_out, d_in]."""
        if self.degenerate:
            return G
        h = self.hyper
        X0, _ = self._point()
        if self.model == "lowrank":
            out = self._lowrank(self._to_param(G.to(X0.dtype)))
            return self._to_param(out) * (self.scale * math.sqrt(self.s) * self.inv_c)
        out = newton_schulz_jvp(X0, self._to_param(G.to(X0.dtype)), h.ns_coefficients, h.ns_steps, h.eps)
        return self._to_param(out) * (self.scale * math.sqrt(self.s) * self.inv_c)


def muon_layer_geometry(
    optimizer: Any,
    group: dict,
    layer: CoveredLayer,
    dtype: torch.dtype,
    lr_ref: float,
    inv_c: float,
    model: str = "jacobian",
) -> MuonLayerGeometry:
    """The layer's :class:`MuonLayerGeometry` from ``optimizer``'s state (a torch.optim.Muon holding
    ``layer.param`` in ``group``); ``lr_ref``: the reference lr (r = group lr / lr_ref); ``model``:
    "jacobian" | "lowrank" (module docstring)."""
    h = MuonHyper.of(group)
    param = layer.param
    if param.dim() != 2 or param.numel() != layer.d_out * layer.d_in:
        raise TypeError(
            f"geometry: Muon parameter {layer.name} of shape {tuple(param.shape)} "
            f"({type(param.data).__name__}) is not a 2-D matrix of its layer's full shape "
            f"({layer.d_out}×{layer.d_in}); the Muon geometry needs the whole matrix (docs/design.md#muon-geometry)"
        )
    alpha, c = h.mix()
    ratio = (h.lr / lr_ref if lr_ref > 0 else 1.0) * adjust_ratio(h.adjust_lr_fn, param.shape)
    buf = optimizer.state.get(param, {}).get("momentum_buffer")
    if buf is not None and hasattr(buf, "full_tensor"):  # FSDP2: Shard(0) → the whole matrix, this layer only
        buf = buf.full_tensor()
    X0 = None if buf is None else (alpha * buf.detach().to(dtype))
    if X0 is None or alpha == 0.0 or float(X0.norm()) <= h.eps:
        return MuonLayerGeometry(layer, h, None, 1.0, None, 1.0, inv_c, True)
    N0 = newton_schulz(X0, h.ns_coefficients, h.ns_steps, h.eps)
    u0_param = ratio * N0
    s = float((X0 * u0_param).sum() / u0_param.square().sum().clamp(min=torch.finfo(dtype).tiny))
    u0 = u0_param.T.contiguous() if layer.transposed else u0_param
    S = None
    if model == "lowrank":
        Y = X0.T if X0.shape[0] > X0.shape[1] else X0
        norm = Y.norm()
        A = (Y @ Y.T) / norm**2
        a, b, cc = h.ns_coefficients
        S = (a * torch.eye(A.shape[0], dtype=A.dtype, device=A.device) + b * A + cc * (A @ A)) / norm
    return MuonLayerGeometry(layer, h, X0, ratio * c, u0, max(s, 0.0), inv_c, False, model, S)


class HybridStateReader(OptimizerStateReader):
    """geometry "muon" / "auto": the optimizers behind ``optimizer`` (:func:`optimizers_of`) are
    torch.optim.Muon and Adam / AdamW. A Muon parameter reads as one whole block with P = I and no
    moments on every rank (its geometry is :class:`MuonLayerGeometry`, attached per step, from the whole
    momentum matrix: FSDP2 gathers it one layer at a time); an Adam parameter reads as the engine's own
    Adam reader (``adam_reader(opt)``: the model view's) does under "auto", and as P = I under "muon".
    Sharded (``replicated`` False) when an Adam reader is: Muon contributions are then never summed over
    ranks (the direction exchange only; docs/design.md#muon-geometry)."""

    def __init__(
        self, optimizer: Any, geometry: str, adam_reader: Callable[[Any], OptimizerStateReader] = TorchAdamStateReader
    ):
        self.geometry = geometry
        self.muon_model = "jacobian"  # set by :meth:`use_model` (check_config, from FTWConfig.muon_model)
        self._v: dict[int, torch.Tensor] = {}  # muon_model "adam": the EMA of the squared gradients
        self._t: dict[int, int] = {}  # ... and the steps it has seen
        self.muon: dict[int, tuple[Any, dict]] = {}
        self.adam: list[OptimizerStateReader] = []
        self.managed: set[int] = set()
        self._adam_groups: list[dict] = []
        for opt in optimizers_of(optimizer):
            if is_muon(opt):
                self.muon.update({id(p): (opt, g) for g in opt.param_groups for p in g["params"]})
            elif is_adam_like(opt):
                if geometry == "auto":
                    self.adam.append(adam_reader(opt))
                self._adam_groups += list(opt.param_groups)
            else:
                raise TypeError(
                    f"optimizer: {type(opt).__module__}.{type(opt).__name__} is not supported by "
                    f"geometry={geometry!r} (supported: torch.optim.Muon with Adam / AdamW)"
                )
            self.managed.update(id(p) for g in opt.param_groups for p in g["params"])

    @property
    def lr_ref(self) -> float:
        """The reference learning rate, now: the first Adam group's (else the first Muon group's)."""
        groups = self._adam_groups + [g for _, g in self.muon.values()]
        return float(groups[0]["lr"]) if groups else 1.0

    def use_model(self, model: str) -> None:
        """``muon_model`` (module docstring); "adam" starts the second-moment EMA (a step pre-hook on each Muon
        optimizer; β2, ε of the first AdamW group)."""
        self.muon_model = model
        if model != "adam":
            return
        if not self._adam_groups:
            raise ValueError("muon_model: 'adam' takes β2 and ε from the run's AdamW param groups; there are none")
        params = [p for opt, g in self.muon.values() for p in g["params"]]
        sharded = [tuple(p.shape) for p in params if type(p.data) is not torch.Tensor]
        if sharded:
            raise ValueError(
                f"muon_model: 'adam' keeps its EMA on whole (unsharded) tensors only; got sharded "
                f"Muon parameters of shapes {sharded[:3]}"
            )
        self._beta2, self._eps = float(self._adam_groups[0]["betas"][1]), float(self._adam_groups[0]["eps"])
        for opt in {id(o): o for o, _ in self.muon.values()}.values():
            opt.register_step_pre_hook(self._observe)

    @torch.no_grad()
    def _observe(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Step pre-hook: v ← β2 v + (1 − β2) g² for every Muon parameter with a gradient (the one it steps on)."""
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.detach()
                v = self._v.get(id(p))
                self._v[id(p)] = (
                    (1.0 - self._beta2) * g * g
                    if v is None
                    else v.mul_(self._beta2).addcmul_(g, g, value=1.0 - self._beta2)
                )
                self._t[id(p)] = self._t.get(id(p), 0) + 1

    def _as_adam(self, param: torch.Tensor) -> ParamState:
        """muon_model "adam": the Muon parameter as an AdamW one (moments handed out bias-corrected, so the
        hyper's β1 is the AdamW group's, for ρ and τ: the same coefficients as the other variants)."""
        opt, group = self.muon[id(param)]
        rows, cols = slice(0, shape_2d(param.shape)[0]), slice(0, shape_2d(param.shape)[1])
        t = self._t.get(id(param), 0)
        buf = opt.state.get(param, {}).get("momentum_buffer")
        beta1 = float(self._adam_groups[0]["betas"][0])
        if t == 0 or buf is None:
            return ParamState(AdamHyper(0, beta1, self._beta2, self._eps), [StateBlock(rows, cols, None, None)])
        mu = float(group["momentum"])
        m_hat = buf.detach() / (1.0 - mu**t)
        v_hat = self._v[id(param)] / (1.0 - self._beta2**t)
        return ParamState(
            AdamHyper(t, beta1, self._beta2, self._eps, bias_correction=False),
            [StateBlock(rows, cols, m_hat.reshape(rows.stop, -1), v_hat.reshape(rows.stop, -1))],
        )

    def muon_group(self, param: torch.Tensor) -> tuple[Any, dict] | None:
        """(the Muon optimizer, its param group) holding ``param``, or None."""
        return self.muon.get(id(param))

    def read(self, param: torch.nn.Parameter) -> ParamState:
        if id(param) not in self.managed:
            raise KeyError("parameter is not managed by the optimizer")
        if id(param) in self.muon and self.muon_model == "adam":
            return self._as_adam(param)
        if id(param) in self.muon or self.geometry == "muon":
            shape = shape_2d(param.shape)
            return ParamState(
                AdamHyper(0, 0.0, 0.0, 0.0), [StateBlock(slice(0, shape[0]), slice(0, shape[1]), None, None)]
            )
        return self._adam_reader(param).read(param)

    @property
    def replicated(self) -> bool:  # type: ignore[override]  # a property where the base has a plain attribute
        return all(r.replicated for r in self.adam)

    def _adam_reader(self, param: torch.Tensor) -> OptimizerStateReader:
        return next(r for r in self.adam if id(param) in r._groups)  # type: ignore[attr-defined]  # TorchAdamStateReader's

    def gather_full(self, param, pieces, shape, dtype, wire, comm=None) -> torch.Tensor:
        """An Adam parameter: its reader's gather; a Muon / identity one: the whole block is local."""
        if self.geometry == "auto" and id(param) not in self.muon:
            return self._adam_reader(param).gather_full(param, pieces, shape, dtype, wire, comm)
        full = torch.zeros(shape, dtype=dtype, device=param.device)
        for rows, cols, value in pieces:
            full[rows, cols] = value.to(dtype)
        return full


def check_config(reader: OptimizerStateReader, layers: Sequence[CoveredLayer], config: FTWConfig) -> set[str]:
    """The covered layers that get the Muon geometry (names); ValueError naming the key for an FTW
    option that cannot carry it. Called once, when FilterThenWeight is built."""
    model = getattr(config, "muon_model", "jacobian")
    if not isinstance(reader, HybridStateReader):
        if model != "jacobian":
            raise ValueError(f"muon_model: {model!r} needs a torch.optim.Muon among the optimizers")
        return set()
    names = {layer.name for layer in layers if reader.muon_group(layer.param) is not None}
    if config.geometry == "muon" and not names:
        raise ValueError(
            f"geometry: 'muon' but no covered layer is in a Muon param group (covered: "
            f"{', '.join(layer.name for layer in layers)})"
        )
    reader.use_model(model)
    if not names or model in ("adam", "identity"):  # read as Adam / P = I layers: the usual machinery
        return set()
    why = "the Muon geometry's K needs Ĵ g_i from each candidate's factors (docs/design.md#muon-geometry)"
    if config.exchange == "sketches":
        raise ValueError(f"exchange: 'sketches' cannot carry the Muon geometry ({why}); use 'direction' or 'factors'")
    if config.gram in ("ghost", "sketch"):
        raise ValueError(
            f"gram: {config.gram!r} has no Muon form ({why}); use 'auto' or 'exact' (Muon layers "
            f"then use the exact Muon Gram)"
        )
    if config.prefilter != "none":
        raise ValueError("prefilter: 'head' is not implemented with the Muon geometry; use 'none'")
    if config.direction_cache:
        raise ValueError("direction_cache: torch.optim.Muon keeps no step count to key the cache on; use false")
    if not reader.replicated and config.exchange != "direction":
        raise ValueError(
            f"exchange: {config.exchange!r} sums block partials over ranks, which the whole-matrix "
            f"Muon layers are not; use 'direction' under a sharded engine"
        )
    return names


def rho_scale(config: FTWConfig) -> float:
    """ρ_μ / s: momentum_coef when set, else the curvature scale γ."""
    return float(config.momentum_coef) if config.momentum_coef is not None else float(config.curvature_scale)


def attach(
    reader: OptimizerStateReader,
    geoms: list,
    layers: Sequence[CoveredLayer],
    names: set[str],
    dtype: torch.dtype,
    tau: float,
    config: FTWConfig,
) -> None:
    """Set ``geoms[i].muon`` for the Muon layers (this step's linearisation; c' = τ/γ)."""
    if not names:
        return
    assert isinstance(reader, HybridStateReader)  # check_config names Muon layers for a hybrid reader only
    inv_c = float(config.curvature_scale) / tau if tau > 0 else 1.0
    for geom, layer in zip(geoms, layers):
        if layer.name in names:
            found = reader.muon_group(layer.param)
            assert found is not None  # check_config names the layers in a Muon param group only
            opt, group = found
            geom.muon = muon_layer_geometry(
                opt,
                group,
                layer,
                dtype,
                reader.lr_ref,
                inv_c,
                getattr(config, "muon_model", "jacobian"),
            )
            geom.identity = geom.muon.degenerate


def layer_muon(geom: LayerGeometry) -> MuonLayerGeometry:
    """``geom.muon`` of a layer that has the Muon geometry (set by :func:`attach`; typed ``object`` there)."""
    if not isinstance(geom.muon, MuonLayerGeometry):
        raise ValueError(f"geometry: {type(geom.muon).__name__} where a Muon layer's MuonLayerGeometry belongs")
    return geom.muon


def note(geoms: list, geometry: str) -> str:
    """The diagnostics' ``preconditioner`` line for a run with Muon layers."""
    muon = [g for g in geoms if g.muon is not None]
    degenerate = sum(g.muon.degenerate for g in muon)
    others = "adam" if geometry == "auto" else "identity"
    lowrank = any(g.muon.model == "lowrank" for g in muon)
    text = f"muon{' lowrank' if lowrank else ''} ({len(muon)} Muon layers; {others} elsewhere)"
    return text + (f"; {degenerate} without a momentum direction yet: identity there" if degenerate else "")


def _grads(A: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients [n, d_out, d_in] = Δᵀ A."""
    return D.transpose(1, 2) @ A


def _chunks(n: int, per_sample: int, max_elems: int):
    step = max(1, max_elems // max(per_sample, 1))
    for s in range(0, n, step):
        yield slice(s, min(s + step, n))


def muon_alignment_and_diag(
    A: torch.Tensor, D: torch.Tensor, M: torch.Tensor, geo: MuonLayerGeometry, max_elems: int = 1 << 24
) -> tuple[torch.Tensor, torch.Tensor]:
    """(b_i = ⟨G_i, M⟩, K_ii = ‖Ĵ G_i‖²) for every sample, two [n]; A [n, T, d_in], D [n, T, d_out]."""
    n = A.shape[0]
    b = torch.empty(n, dtype=M.dtype, device=M.device)
    diag = torch.empty_like(b)
    for rows in _chunks(n, M.numel() * 4, max_elems):
        G = _grads(A[rows].to(M.dtype), D[rows].to(M.dtype))
        b[rows] = (G * M).sum(dim=(1, 2))
        diag[rows] = geo.apply(G).square().sum(dim=(1, 2))
    return b, diag


def muon_gram(
    A: torch.Tensor, D: torch.Tensor, geo: MuonLayerGeometry, dtype: torch.dtype, max_elems: int = 1 << 24
) -> torch.Tensor:
    """K [n, n] = Z Zᵀ with Z_i = Ĵ G_i (the survivors' exact Muon Gram)."""
    n = A.shape[0]
    Z = torch.empty(n, geo.layer.d_out * geo.layer.d_in, dtype=dtype, device=A.device)
    for rows in _chunks(n, Z.shape[1] * 4, max_elems):
        Z[rows] = geo.apply(_grads(A[rows].to(dtype), D[rows].to(dtype))).reshape(rows.stop - rows.start, -1)
    return Z @ Z.T


__all__ = [
    "HybridStateReader",
    "MUON_CLASS_NAMES",
    "MuonHyper",
    "MuonLayerGeometry",
    "adjust_ratio",
    "attach",
    "check_config",
    "is_muon",
    "layer_muon",
    "note",
    "rho_scale",
    "muon_alignment_and_diag",
    "muon_gram",
    "muon_layer_geometry",
    "newton_schulz",
    "newton_schulz_jvp",
    "optimizers_of",
]
