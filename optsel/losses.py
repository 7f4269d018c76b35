"""The per-sample loss, one definition for selection and training (docs/design.md#the-step).

ℓ_i = token-mean cross-entropy of sample i over its labelled positions: logits [n, T, V] at position t
predict labels [n, T] at t+1; positions labelled -100 are ignored. FTW's capture, the baselines' scores,
the engines' training objective and the evaluation all call :func:`per_sample_token_mean_ce`, so the
loss that selection reasons about is the loss that is trained.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class SampleLosses(NamedTuple):
    """loss: [n] (nats; float32 for half-precision logits, else the logits' dtype); 0 for a sample
    without any valid (shifted) label. num_tokens: [n] int64, the sample's valid label count."""

    loss: torch.Tensor
    num_tokens: torch.Tensor

    @property
    def empty(self) -> torch.Tensor:
        """[n] bool: samples that have no valid label (their loss is 0 and carries no gradient)."""
        return self.num_tokens == 0


def per_sample_token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> SampleLosses:
    """Token-mean CE of each sample (see the module docstring). bf16/fp16 logits are upcast to
    float32; float32 and float64 logits keep their dtype (the brute-force tests run in float64)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"labels: expected shape {tuple(logits.shape[:2])} to match logits {tuple(logits.shape)}, "
            f"got {tuple(labels.shape)}"
        )
    n, t, v = logits.shape
    shifted = logits[:, :-1]
    if shifted.dtype in (torch.float16, torch.bfloat16):
        shifted = shifted.float()
    shifted_labels = labels[:, 1:].to(logits.device)
    token_loss = F.cross_entropy(
        shifted.reshape(-1, v), shifted_labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(n, max(t - 1, 0))
    num_tokens = (shifted_labels != IGNORE_INDEX).sum(dim=1)
    return SampleLosses(token_loss.sum(dim=1) / num_tokens.clamp(min=1).to(token_loss.dtype), num_tokens)
