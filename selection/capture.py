"""Per-sample gradient factors from one forward/backward over a batch (docs/design.md#factored-gradients).

For a covered linear layer y = a Wᵀ (W: [d_out, d_in]) the gradient of sample i's own loss is
G_i = Δ_iᵀ A_i with A_i [T, d_in] the layer inputs and Δ_i [T, d_out] the gradients of ℓ_i
(sample i's token-mean CE) w.r.t. the layer outputs. Forward hooks record the inputs and the
outputs; ``torch.autograd.grad`` of Σ_i ℓ_i w.r.t. the recorded outputs gives every Δ_i at once
(samples do not interact in a causal LM, so ∂(Σ_j ℓ_j)/∂y_i = ∂ℓ_i/∂y_i: no rescaling needed) and
never touches any parameter's ``.grad``.

Covered: the weight of every ``nn.Linear`` and transformers ``Conv1D`` (GPT-2; its weight is stored
transposed, [d_in, d_out]) whose weight requires grad — with peft, the LoRA adapter matrices
(``lora_A`` / ``lora_B`` are nn.Linear) and not the frozen base weight. A weight that is also used
by another module (``lm_head`` tied to ``embed_tokens``) is excluded and reported: counting only the
linear use would be half its gradient. A module called several times per forward contributes one
(A, Δ) pair per call, concatenated along T.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from optsel import distributed
from optsel.losses import per_sample_token_mean_ce
from optsel.selection.layers import CoveredLayer
from optsel.selection.model_view import ModelView, model_view_for
from optsel.selection.single_pass import Leaf, LeafCall, PoolPass

_CONV1D: tuple[type, ...]  #: transformers' Conv1D (GPT-2 style linear with transposed weight), when importable
try:
    from transformers.pytorch_utils import Conv1D

    _CONV1D = (Conv1D,)
except ImportError:  # pragma: no cover - transformers is a hard dependency
    _CONV1D = ()


@dataclass
class Factors:
    """Factors of a batch. A[l]: [n, T_l, d_in], D[l]: [n, T_l, d_out]. D is exactly 0 on padding
    positions (no loss term depends on them: labels -100 there, and the attention mask gives real
    tokens exactly zero weight on them), so A's padding rows never count and are not masked (a mask
    would copy every activation once more);
    loss: [n] per-sample token-mean CE (0 for a sample without target tokens); tokens: [n] counts."""

    A: list[torch.Tensor]
    D: list[torch.Tensor]
    loss: torch.Tensor
    tokens: torch.Tensor

    @property
    def num_samples(self) -> int:
        return int(self.loss.shape[0])

    def rows(self, start: int, stop: int) -> Factors:
        """Samples start..stop-1 as views (no copy)."""
        return Factors(
            [a[start:stop] for a in self.A],
            [d[start:stop] for d in self.D],
            self.loss[start:stop],
            self.tokens[start:stop],
        )

    def select(self, rows: torch.Tensor) -> Factors:
        return Factors([a[rows] for a in self.A], [d[rows] for d in self.D], self.loss[rows], self.tokens[rows])


@dataclass
class Coverage:
    layers: list[CoveredLayer]
    excluded: dict[str, str] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]


def find_covered_layers(model: nn.Module, view: ModelView | None = None) -> Coverage:
    """The trainable linear weights of ``model`` (see module docstring) and what was left out, why.

    view: the engine's model view (default: the one registered for ``model``, else the plain one). It
    is prepared first, so that ``module.weight`` is the tensor the optimizer holds, and it gives each
    weight's full shape (a sharded weight's local shape is only its part)."""
    view = view or model_view_for(model)
    view.prepare()
    owners: dict[int, list[str]] = {}
    for mod_name, module in model.named_modules(remove_duplicate=False):
        for p_name, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append(f"{mod_name}.{p_name}" if mod_name else p_name)
    layers: list[CoveredLayer] = []
    excluded: dict[str, str] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        is_linear = isinstance(module, nn.Linear)
        is_conv1d = isinstance(module, _CONV1D)
        if not (is_linear or is_conv1d):
            continue
        weight = module.weight
        name = f"{mod_name}.weight" if mod_name else "weight"
        if not weight.requires_grad or id(weight) in seen:
            continue
        seen.add(id(weight))
        uses = sorted(set(owners.get(id(weight), [name])))
        if len(uses) > 1:
            excluded[name] = f"tied weight shared by {uses}: excluded (only part of its gradient is linear-layer form)"
            continue
        shape = view.full_shape(weight)
        if len(shape) != 2:
            raise ValueError(f"model: linear weight {name} has shape {shape}, expected 2-D")
        d_in, d_out = shape if is_conv1d else shape[::-1]
        layers.append(CoveredLayer(name, module, weight, int(d_in), int(d_out), transposed=is_conv1d))
    if not layers:
        raise ValueError("model: no trainable nn.Linear / Conv1D / LoRA weight to cover")
    return Coverage(layers, excluded)


class _Hooked(Protocol):
    """What :class:`_Recorder` hooks: a CoveredLayer or a single-pass Leaf."""

    @property
    def module(self) -> nn.Module: ...


class _Recorder:
    """Forward hooks that keep each covered module's (input, output) per call."""

    def __init__(self, layers: Sequence[_Hooked]):
        self.calls: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]
        self.handles = [layer.module.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, index: int):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if torch.is_grad_enabled() and output.requires_grad:
                self.calls[index].append((inputs[0].detach(), output))

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def compute_dtype(factors_or_tensor: Factors | torch.Tensor, choice: str = "auto") -> torch.dtype:
    """The dtype selection computes in: float64 for float64 factors, else float32; ``choice`` (a torch
    dtype name) overrides "auto"."""
    if choice != "auto":
        return getattr(torch, choice)
    ref = factors_or_tensor.A[0] if isinstance(factors_or_tensor, Factors) else factors_or_tensor
    return torch.float64 if ref.dtype == torch.float64 else torch.float32


def stack_batches(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rows of ``second`` after those of ``first`` (input_ids, attention_mask, labels), right-padded to
    the wider of the two (pad id 0, mask 0, label -100: padding adds nothing to any loss)."""
    width = max(int(first["input_ids"].shape[1]), int(second["input_ids"].shape[1]))
    fill = {"input_ids": 0, "attention_mask": 0, "labels": -100}
    return {
        key: torch.cat([F.pad(b[key], (0, width - b[key].shape[1]), value=value) for b in (first, second)])
        for key, value in fill.items()
    }


def capture_factors(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layers: list[CoveredLayer],
    chunk_size: int | None = None,
    pool_pass: PoolPass | None = None,
    leaves: list[Leaf] | None = None,
) -> Factors:
    """(A, Δ) of every covered layer for every sample of ``batch`` (see :class:`Factors`).

    batch: input_ids / attention_mask / labels [n, T]. chunk_size: samples per forward/backward
    (None: all at once). Parameter ``.grad`` is left untouched; the model's train/eval mode too.
    pool_pass + leaves (selection/single_pass.py): the same backward also records every leaf's
    (input, output gradient) into ``pool_pass``, from which the training gradient follows.
    """
    n = int(batch["input_ids"].shape[0])
    step = n if not chunk_size else max(1, int(chunk_size))
    device = layers[0].param.device  # pools arrive on the CPU from the dataloader
    parts = [
        _capture_chunk(
            model,
            {k: batch[k][s : s + step].to(device) for k in ("input_ids", "attention_mask", "labels")},
            layers,
            pool_pass,
            leaves,
            s,
        )
        for s in range(0, n, step)
    ]
    if pool_pass is not None:
        pool_pass.loss = torch.cat([p.loss for p in parts]).float()
        pool_pass.tokens = torch.cat([p.tokens for p in parts])
    if len(parts) == 1:
        return parts[0]
    width = [max(p.A[l].shape[1] for p in parts) for l in range(len(layers))]
    pad = lambda t, w: F.pad(t, (0, 0, 0, w - t.shape[1]))  # noqa: E731
    return Factors(
        A=[torch.cat([pad(p.A[l], width[l]) for p in parts]) for l in range(len(layers))],
        D=[torch.cat([pad(p.D[l], width[l]) for p in parts]) for l in range(len(layers))],
        loss=torch.cat([p.loss for p in parts]),
        tokens=torch.cat([p.tokens for p in parts]),
    )


def _capture_chunk(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layers: list[CoveredLayer],
    pool_pass: PoolPass | None = None,
    leaves: list[Leaf] | None = None,
    offset: int = 0,
) -> Factors:
    mask = batch["attention_mask"]
    recorder = _Recorder(layers)
    leaf_recorder = _Recorder(leaves) if pool_pass is not None and leaves else None
    try:
        with torch.enable_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
            loss, tokens = per_sample_token_mean_ce(logits, batch["labels"])
            outputs = [out for calls in recorder.calls for _, out in calls]
            if not outputs:
                raise RuntimeError("capture: no covered layer ran with grad enabled in the forward")
            leaf_outputs = [out for calls in leaf_recorder.calls for _, out in calls] if leaf_recorder else []
            grads = torch.autograd.grad(loss.sum(), outputs + leaf_outputs, allow_unused=True)
    finally:
        recorder.close()
        if leaf_recorder is not None:
            leaf_recorder.close()
    if leaf_recorder is not None:
        assert leaves is not None and pool_pass is not None  # leaf_recorder is built only with both
        leaf_grads = iter(grads[len(outputs) :])
        for leaf, calls in zip(leaves, leaf_recorder.calls):
            for inp, out in calls:
                grad = next(leaf_grads)
                pool_pass.calls.append(
                    LeafCall(leaf, inp, torch.zeros_like(out) if grad is None else grad.detach(), offset)
                )
        grads = grads[: len(outputs)]
    A: list[torch.Tensor] = []
    D: list[torch.Tensor] = []
    it = iter(grads)
    for layer, calls in zip(layers, recorder.calls):
        a_parts, d_parts = [], []
        for inp, out in calls:
            grad = next(it)
            if inp.dim() != 3 or inp.shape[:2] != mask.shape:
                raise ValueError(
                    f"capture: layer {layer.name} saw input of shape {tuple(inp.shape)}, "
                    f"expected [n, T, d_in] matching attention_mask {tuple(mask.shape)}"
                )
            grad = torch.zeros_like(out) if grad is None else grad
            a_parts.append(inp)  # no mask, no copy: Δ is exactly 0 on padding (see Factors)
            d_parts.append(grad.detach().to(inp.dtype))
        if not a_parts:
            n = mask.shape[0]
            a_parts, d_parts = (
                [mask.new_zeros((n, 1, layer.d_in), dtype=loss.dtype)],
                [mask.new_zeros((n, 1, layer.d_out), dtype=loss.dtype)],
            )
        A.append(a_parts[0] if len(a_parts) == 1 else torch.cat(a_parts, dim=1))
        D.append(d_parts[0] if len(d_parts) == 1 else torch.cat(d_parts, dim=1))
    return Factors(A, D, loss.detach(), tokens)


def gather_factors(factors: Factors, dtype: torch.dtype, comm: distributed.CommCounter | None = None) -> Factors:
    """Factors in ``dtype``, all-gathered over ranks (rank-major, each layer's T padded to its global max);
    on one process only the dtype changes. Every rank must call it. 7 collectives whatever the number of
    layers: the widths' all-reduce, then one all-gather each for the packed A/Δ, the losses, the counts."""
    A = [a.to(dtype) for a in factors.A]
    D = [d.to(dtype) for d in factors.D]
    if not distributed.is_distributed():
        return Factors(A, D, factors.loss, factors.tokens)
    widths = [int(w) for w in distributed.all_reduce_max(torch.tensor([a.shape[1] for a in A]), comm)]
    # One all-gather for every layer's A and Δ: each sample's padded [w_l, d] blocks flattened side by side
    # into one [n, Σ] row. Per-layer gathers cost 4 collectives a layer, and their latency, not their bytes,
    # dominated LoRA's many thin layers (16 rank-8 factors on the demo model: 69 collectives, now 7).
    parts = [F.pad(t, (0, 0, 0, w - t.shape[1])) for a, d, w in zip(A, D, widths) for t in (a, d)]
    packed = distributed.all_gather_cat(torch.cat([p.flatten(1) for p in parts], dim=1), comm)
    sizes = [p.shape[1] * p.shape[2] for p in parts]
    rows = int(packed.shape[0])
    out = [chunk.reshape(rows, *p.shape[1:]) for chunk, p in zip(packed.split(sizes, dim=1), parts)]
    return Factors(
        out[0::2],
        out[1::2],
        distributed.all_gather_cat(factors.loss, comm),
        distributed.all_gather_cat(factors.tokens, comm),
    )
