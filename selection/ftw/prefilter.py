"""Stage 1 of two-stage FTW (``prefilter: head``, docs/design.md, "Two stages"): the output layer's exact
alignment from a forward pass alone.

For the output layer z_t = W h_t (W: [V, d], the LM head; tied to the input embedding or not) the
gradient of sample i's token-mean loss is G_i = Δ_iᵀ H_i with H_i [T, d] the head's inputs and
Δ_i [T, V] rows δ_t = (softmax(z_t) − e_{y_{t+1}}) / n_i at the n_i labelled positions (0 elsewhere):
no backward is needed. With M = P ⊙ (G_V − ρ m̂) on the head (P and m̂ of the head's weight, or of the
tied embedding's, whose optimizer state is the one that weight has) the stage-1 score is FTW's own
utility restricted to that layer:

    b_i = ⟨G_i, M⟩,  K_ii = ⟨P, G_i²⟩,  u_i = b_i − (τ/(2k)) K_ii

formed exactly from one formation of each G_i per chunk (selection/gram.py). A scoring window of W
tokens per sample (``prefilter_window``) cuts the forward further: see :func:`scoring_window` for which
tokens and what that approximates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from optsel.selection.capture import BATCH_KEYS, agreed_plan, chunk_batch, idle_pass_batch
from optsel.selection.layers import CoveredLayer
from optsel.selection.model_view import ModelView

IGNORE = -100


def output_layer(model: nn.Module, view: ModelView) -> CoveredLayer:
    """The model's LM head as a layer [V, d] (``get_output_embeddings()``, an ``nn.Linear``; its
    weight may be tied to the input embedding). A clear error when there is none or it is frozen."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    if not isinstance(head, nn.Linear):
        raise ValueError(
            f"prefilter: 'head' needs a model whose get_output_embeddings() is an nn.Linear (got {type(head).__name__})"
        )
    if not head.weight.requires_grad:
        raise ValueError(
            "prefilter: 'head' scores with the output layer's gradient, but its weight is frozen "
            "(LoRA without a trainable head?): use prefilter: none"
        )
    name = next((f"{n}.weight" for n, mod in model.named_modules() if mod is head), "lm_head.weight")
    d_out, d_in = (int(s) for s in view.full_shape(head.weight))
    # nn.Linear's stubs say Tensor; it is the head's Parameter (passed on as it is, no check added)
    return CoveredLayer(name, head, cast(nn.Parameter, head.weight), d_in, d_out)


def scoring_window(
    batch: Mapping[str, torch.Tensor], window: int | None
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Each sample's scoring window of ``window`` tokens and its position ids ([n, W]; None: the whole
    batch, unchanged).

    The window starts ``window // 4`` tokens before the sample's first labelled token (clipped to the
    sample), so in SFT it holds the start of the response with a little of the prompt before it, and
    in plain LM data the first W tokens. Tokens before the window are dropped: the scored tokens see a
    truncated context, exact only when the window starts at 0 (short prompts); position ids keep the
    tokens' real positions. The label at the window's first position has no predecessor and is not
    scored. Batches must be right-padded (attention mask a prefix of ones)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n, T = ids.shape
    if window is None or window >= T:
        return dict(batch), None
    lengths = mask.sum(1)
    steps = torch.arange(T, device=mask.device)
    if not torch.equal(mask.bool(), steps[None] < lengths[:, None]):
        raise ValueError("prefilter_window: needs right-padded batches (attention_mask a prefix of ones)")
    labelled = labels != IGNORE
    labelled[:, 0] = False  # never scored (no predecessor)
    first = torch.where(labelled.any(1), labelled.float().argmax(1), torch.zeros_like(lengths))
    start = (first - window // 4).clamp(min=0)
    start = torch.minimum(start, (lengths - window).clamp(min=0))
    pos = start[:, None] + torch.arange(window, device=mask.device)[None]
    inside = pos < lengths[:, None]
    idx = pos.clamp(max=T - 1)
    out = {
        "input_ids": torch.where(inside, ids.gather(1, idx), 0),
        "attention_mask": inside.to(mask.dtype),
        "labels": torch.where(inside, labels.gather(1, idx), IGNORE),
    }
    return out, pos


def decoder_blocks(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model's stack of decoder blocks as (parent, attribute, the ``nn.ModuleList``): the one
    ModuleList whose length is the config's ``num_hidden_layers`` (Llama's ``model.layers``, GPT-2's
    ``transformer.h``; inside a PEFT wrapper too). A clear error when there is none or several."""
    config = getattr(model, "config", None)
    depth = getattr(config, "num_hidden_layers", None)
    found = [
        (parent, name, child)
        for _, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.ModuleList) and depth is not None and len(child) == depth
    ]
    if len(found) != 1:
        raise ValueError(
            f"prefilter_depth: needs one nn.ModuleList of config.num_hidden_layers={depth} decoder blocks, "
            f"found {len(found)}: use prefilter_depth: null"
        )
    return found[0]


@contextmanager
def early_exit(model: nn.Module, depth: int | None) -> Iterator[None]:
    """Within the block, the model's forward runs only its first ``depth`` decoder blocks, then its final
    norm and output layer (None: unchanged). The blocks stay the same modules (an engine's hooks on them,
    ZeRO-3's or FSDP2's, are untouched; a skipped block's parameters are never gathered); only the list
    the forward iterates is shortened, and restored on exit."""
    if depth is None:
        yield
        return
    parent, name, blocks = decoder_blocks(model)
    if depth > len(blocks):
        raise ValueError(f"prefilter_depth: {depth} exceeds the model's {len(blocks)} decoder blocks")
    parent._modules[name] = nn.ModuleList(list(blocks)[:depth])  # no re-registration hooks: a plain swap
    try:
        yield
    finally:
        parent._modules[name] = blocks


@dataclass
class HeadFactors:
    """One pass's head factors: H [c, W, d] inputs, D [c, W, V] output gradients δ (0 off labels),
    tokens [c] labelled counts, rows [c] the batch rows they are."""

    H: torch.Tensor
    D: torch.Tensor
    tokens: torch.Tensor
    rows: torch.Tensor


class HeadScorer:
    """Forward-only output-layer factors of a batch (module docstring). ``window``: W tokens per
    sample or None; ``chunk_size`` / ``chunk_tokens``: the passes, as the capture's
    (selection/capture.py ``plan_chunks``: length-sorted, each cut to its longest row, under a token budget;
    agreed across the ranks of a sharded engine); ``depth``: the decoder blocks the forward runs before the
    head (:func:`early_exit`; None: all)."""

    def __init__(
        self,
        model: nn.Module,
        head: CoveredLayer,
        window: int | None,
        chunk_size: int | None = None,
        chunk_tokens: int | None = None,
        depth: int | None = None,
    ):
        self.model, self.head, self.window, self.depth = model, head, window, depth
        self.chunk_size, self.chunk_tokens = chunk_size, chunk_tokens
        if depth is not None:
            with early_exit(model, depth):  # fail at construction: no block stack, or too few blocks
                pass

    @torch.no_grad()
    def chunks(self, batch: Mapping[str, torch.Tensor], dtype: torch.dtype) -> Iterator[HeadFactors]:
        device = self.head.param.device
        scored, pos = scoring_window(batch, self.window)
        plan, idle = agreed_plan(self.model, scored, self.chunk_size, self.chunk_tokens)
        for c in plan:
            where = None if pos is None else pos[c.rows.to(pos.device), : c.width].to(device)
            yield self._factors(chunk_batch(scored, c, BATCH_KEYS, device), where, dtype, c.rows)
        for _ in range(idle):  # a sharded engine's ranks run the same number of forwards
            self._factors(idle_pass_batch(scored, device), None, dtype, torch.zeros(0, dtype=torch.int64))

    def _factors(
        self, part: dict[str, torch.Tensor], pos: torch.Tensor | None, dtype: torch.dtype, rows: torch.Tensor
    ) -> HeadFactors:
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        handle = self.head.module.register_forward_hook(lambda mod, inp, out: seen.append((inp[0], out)))
        try:
            kwargs = {"position_ids": pos} if pos is not None else {}
            with early_exit(self.model, self.depth):
                logits = self.model(input_ids=part["input_ids"], attention_mask=part["attention_mask"], **kwargs).logits
        finally:
            handle.remove()
        if len(seen) != 1:
            raise ValueError(f"prefilter: the output layer ran {len(seen)} times in one forward, expected once")
        h, z = seen[0]
        if z.shape != logits.shape or not torch.allclose(z.to(logits.dtype), logits):
            raise ValueError(
                "prefilter: the model's logits are not its output layer's output (softcapping or "
                "scaling after the head?): 'head' would score the wrong gradient; use prefilter: none"
            )
        labels = part["labels"][:, 1:]
        valid = labels != IGNORE
        tokens = valid.sum(1)
        delta = torch.softmax(z[:, :-1].to(dtype), dim=-1)
        delta.scatter_add_(
            -1, labels.clamp(min=0)[..., None], -valid[..., None].to(dtype)
        )  # − e_y at labelled positions
        delta = delta * (valid.to(dtype) / tokens.clamp(min=1).to(dtype)[:, None])[..., None]
        D = torch.cat([delta, delta.new_zeros(delta.shape[0], 1, delta.shape[2])], dim=1)
        return HeadFactors(h.to(dtype), D, tokens.cpu(), rows)

    def target_gradient(self, batch: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """G_V of the head, [V, d]: the mean over the batch's samples of Δ_iᵀ H_i."""
        total = torch.zeros(self.head.d_out, self.head.d_in, dtype=dtype, device=self.head.param.device)
        n = 0
        for f in self.chunks(batch, dtype):
            total += f.D.reshape(-1, f.D.shape[-1]).T @ f.H.reshape(-1, f.H.shape[-1])
            n += int(f.tokens.shape[0])
        return total / max(n, 1)


__all__ = ["HeadFactors", "HeadScorer", "decoder_blocks", "early_exit", "output_layer", "scoring_window"]
