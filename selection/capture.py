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


#: the keys of a batch that a capture pass runs on
BATCH_KEYS = ("input_ids", "attention_mask", "labels")


def row_extents(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[n]: each row's extent, one past its last attended or labelled position (0 for an empty row).
    Columns at or beyond a row's extent are padding it never reads: a pass may drop them."""
    mask, labels = batch["attention_mask"], batch["labels"]
    used = (mask != 0) | (labels != -100)
    T = used.shape[1]
    last = torch.where(used, torch.arange(1, T + 1, device=used.device), 0)
    return last.max(1).values.cpu() if T else torch.zeros(used.shape[0], dtype=torch.int64)


@dataclass
class Chunk:
    """One capture pass: ``rows`` [c] of the batch (in pass order) and the ``width`` the pass keeps."""

    rows: torch.Tensor
    width: int


def plan_chunks(
    batch: Mapping[str, torch.Tensor],
    chunk_size: int | None = None,
    chunk_tokens: int | None = None,
    passes: int | None = None,
) -> list[Chunk]:
    """The capture's passes over ``batch``.

    - neither: one pass over every row at the padded width;
    - ``chunk_size`` s: rows in order, s per pass, at the padded width;
    - ``chunk_tokens`` t: rows sorted by extent (:func:`row_extents`, longest first), packed greedily so that
      a pass's rows × its longest extent stays ≤ t (a row longer than t gets a pass alone); each pass is cut
      to its own longest row, so a pool of mixed lengths pays for its tokens, not for its longest row n times.

    ``passes``: at least this many (every rank of a sharded engine must run the same number of forwards:
    :func:`capture_factors` agrees it); the longest passes are split, rows that are left over make none."""
    n = int(batch["input_ids"].shape[0])
    width = int(batch["input_ids"].shape[1])
    if chunk_tokens is not None:
        ext = row_extents(batch)
        order = torch.argsort(ext, descending=True, stable=True)
        chunks: list[list[int]] = []
        for r in order.tolist():
            if chunks and (len(chunks[-1]) + 1) * max(int(ext[chunks[-1][0]]), 1) <= chunk_tokens:
                chunks[-1].append(r)
            else:
                chunks.append([r])
        plan = [Chunk(torch.tensor(c, dtype=torch.int64), max(1, int(ext[c[0]]))) for c in chunks]
    else:
        step = n if not chunk_size else max(1, int(chunk_size))
        plan = [Chunk(torch.arange(s, min(s + step, n)), width) for s in range(0, n, step)] if n else []
    while passes is not None and len(plan) < passes and any(c.rows.numel() > 1 for c in plan):
        big = max(range(len(plan)), key=lambda i: (plan[i].rows.numel() > 1, plan[i].rows.numel() * plan[i].width))
        c = plan.pop(big)
        half = (c.rows.numel() + 1) // 2
        plan[big:big] = [Chunk(c.rows[:half], c.width), Chunk(c.rows[half:], c.width)]
    return plan


def agreed_plan(
    model: nn.Module, batch: Mapping[str, torch.Tensor], chunk_size: int | None, chunk_tokens: int | None
) -> tuple[list[Chunk], int]:
    """(:func:`plan_chunks`' passes, the idle passes to run after them). Under an engine whose forward runs
    collectives (ZeRO-3's gathers, FSDP2's unshards) a chunked capture's pass count is agreed by one all-reduce
    (the largest rank's): a rank with fewer splits its longest passes, and runs idle passes when it has too
    few rows. Everywhere else the local plan, nothing idle."""
    plan = plan_chunks(batch, chunk_size, chunk_tokens)
    chunked = bool(chunk_size) or chunk_tokens is not None
    if not (chunked and distributed.is_distributed() and model_view_for(model).collective_forward):
        return plan, 0
    agreed = int(distributed.all_reduce_max(torch.tensor([len(plan)], dtype=torch.int64))[0])
    if agreed > len(plan):
        plan = plan_chunks(batch, chunk_size, chunk_tokens, passes=agreed)
    return plan, agreed - len(plan)


def chunk_batch(
    batch: Mapping[str, torch.Tensor], chunk: Chunk, keys: Sequence[str], device: torch.device
) -> dict[str, torch.Tensor]:
    """The pass's rows of ``batch`` cut to its width, on ``device`` (a view where the rows are a range)."""
    rows = chunk.rows
    if rows.numel() and bool((rows.diff() == 1).all()):
        start, stop = int(rows[0]), int(rows[-1]) + 1
        return {k: batch[k][start:stop, : chunk.width].to(device) for k in keys}
    return {k: batch[k][rows.to(batch[k].device), : chunk.width].to(device) for k in keys}


def idle_pass_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """One row of one attended pad token and no label: a forward that keeps a rank in step and adds nothing."""
    ids = batch["input_ids"]
    return {
        "input_ids": torch.zeros(1, 1, dtype=ids.dtype, device=device),
        "attention_mask": torch.ones(1, 1, dtype=batch["attention_mask"].dtype, device=device),
        "labels": torch.full((1, 1), -100, dtype=batch["labels"].dtype, device=device),
    }


def capture_factors(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layers: list[CoveredLayer],
    chunk_size: int | None = None,
    pool_pass: PoolPass | None = None,
    leaves: list[Leaf] | None = None,
    chunk_tokens: int | None = None,
) -> Factors:
    """(A, Δ) of every covered layer for every sample of ``batch`` (see :class:`Factors`), rows in the batch's order.

    batch: input_ids / attention_mask / labels [n, T]. chunk_size / chunk_tokens: the passes
    (:func:`plan_chunks`; None: all at once). Under a sharded engine every rank runs the same number of passes
    (agreed; a rank short of rows runs label-free one-token passes). Parameter ``.grad`` is left untouched; the
    model's train/eval mode too. pool_pass + leaves (selection/single_pass.py): the same backward also records
    every leaf's (input, output gradient) into ``pool_pass``, from which the training gradient follows.
    """
    n = int(batch["input_ids"].shape[0])
    device = layers[0].param.device  # pools arrive on the CPU from the dataloader
    plan, idle = agreed_plan(model, batch, chunk_size, chunk_tokens)
    parts = [
        _capture_chunk(model, chunk_batch(batch, c, BATCH_KEYS, device), layers, pool_pass, leaves, c.rows)
        for c in plan
    ]
    for _ in range(idle):
        _capture_chunk(
            model, idle_pass_batch(batch, device), layers, pool_pass, leaves, torch.zeros(0, dtype=torch.int64)
        )
    if not parts:  # no rows: empty factors, no forward of its own (a sharded rank ran its agreed idle passes)
        dtype = layers[0].param.dtype
        empty = Factors(
            [torch.zeros(0, 1, layer.d_in, dtype=dtype, device=device) for layer in layers],
            [torch.zeros(0, 1, layer.d_out, dtype=dtype, device=device) for layer in layers],
            torch.zeros(0, device=device),
            torch.zeros(0, dtype=torch.int64),
        )
        if pool_pass is not None:
            pool_pass.loss, pool_pass.tokens = empty.loss.float(), empty.tokens
        return empty
    in_order = len(parts) == 1 and torch.equal(plan[0].rows, torch.arange(n))
    out = (
        parts[0]
        if in_order
        else Factors(
            A=[scatter_rows([p.A[l] for p in parts], plan, n) for l in range(len(layers))],
            D=[scatter_rows([p.D[l] for p in parts], plan, n) for l in range(len(layers))],
            loss=scatter_rows([p.loss for p in parts], plan, n),
            tokens=scatter_rows([p.tokens for p in parts], plan, n),
        )
    )
    if pool_pass is not None:
        pool_pass.loss, pool_pass.tokens = out.loss.float(), out.tokens
    return out


def scatter_rows(parts: list[torch.Tensor], plan: list[Chunk], n: int) -> torch.Tensor:
    """The passes' [c, ...] tensors as one [n, ...] in the batch's row order, dim 1 zero-padded to the widest."""
    ref = parts[0]
    tail = list(ref.shape[1:])
    if ref.dim() >= 2:
        tail[0] = max(int(p.shape[1]) for p in parts)
    out = ref.new_zeros((n, *tail))
    for p, c in zip(parts, plan):
        rows = c.rows.to(out.device)
        if p.dim() >= 2:
            out[rows, : p.shape[1]] = p
        else:
            out[rows] = p
    return out


def _capture_chunk(
    model: nn.Module,
    batch: Mapping[str, torch.Tensor],
    layers: list[CoveredLayer],
    pool_pass: PoolPass | None,
    leaves: list[Leaf] | None,
    rows: torch.Tensor,
) -> Factors:
    """One pass; ``rows`` [c]: the batch rows this pass's rows are (for the single pass's leaf calls)."""
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
                    LeafCall(leaf, inp, torch.zeros_like(out) if grad is None else grad.detach(), rows)
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
