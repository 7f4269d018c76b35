"""Target evaluation: validation loss and exact-match accuracy of greedy answers.

Every rank evaluates its own share of the held-out target samples and the results are summed over
ranks, so every rank must call :func:`evaluate` (ZeRO-3 / FSDP gather parameters inside forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from optsel import distributed
from optsel.selection.base import Batch


@dataclass
class EvalResult:
    loss: float  # mean per-sample token-mean CE over the held-out target samples (nats)
    exact_match: float  # share of prompts whose greedy answer equals the reference exactly
    num_samples: int


def split_prompt_answer(batch: Batch) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per sample: prompt ids [p] and reference answer ids [a] (the labelled tokens)."""
    prompts, answers = [], []
    for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
        length = int(mask.sum())
        labelled = (labels[:length] != -100).nonzero().flatten()
        start = int(labelled[0]) if labelled.numel() else length
        prompts.append(ids[:start])
        answers.append(ids[start:length])
    return prompts, answers


def answers_match(generated: torch.Tensor, reference: torch.Tensor, eos_id: int) -> bool:
    """Exact match of the generated tokens (cut at EOS) and the reference (without its EOS)."""
    ref = reference[reference != eos_id] if eos_id is not None else reference
    gen = generated
    stop = (gen == eos_id).nonzero().flatten()
    if stop.numel():
        gen = gen[: int(stop[0])]
    return gen.numel() == ref.numel() and bool(torch.equal(gen, ref.to(gen.dtype)))


def _left_padded(prompts: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts [p_i] → left-padded ids and mask [n, max p_i]."""
    width = max(int(p.numel()) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        if p.numel():
            ids[i, width - p.numel() :] = p
            mask[i, width - p.numel() :] = 1
    return ids, mask


def evaluate(engine, batches: list[Batch], max_new_tokens: int, pad_id: int, eos_id: int) -> EvalResult:
    """Loss and exact match over this rank's ``batches``, summed over ranks."""
    loss_sum, hits, count = 0.0, 0, 0
    module = engine.module
    was_training = module.training
    module.eval()
    try:
        for batch in batches:
            losses = engine.per_sample_loss(batch)
            loss_sum += float(losses.detach().double().sum())
            prompts, answers = split_prompt_answer(batch)
            ids, mask = _left_padded(prompts, pad_id)
            generated = engine.generate(ids, mask, max_new_tokens)
            hits += sum(answers_match(g, a, eos_id) for g, a in zip(generated, answers))
            count += len(prompts)
    finally:
        module.train(was_training)
    totals = distributed.all_reduce_sum(torch.tensor([loss_sum, float(hits), float(count)], dtype=torch.float64))
    n = int(totals[2])
    return EvalResult(loss=float(totals[0]) / max(n, 1), exact_match=float(totals[1]) / max(n, 1), num_samples=n)
