"""What both engines share: a Hugging Face causal LM behind ``module``, its per-sample losses, the
weighted backward, greedy generation and the LR. An engine subclasses :class:`CausalLMEngine` and adds
how it backpropagates (``_backward``) and what a forward without backward leaves to tidy
(``_after_forward``), besides its own step, checkpoint and gradient checks."""

from __future__ import annotations

import torch

from optsel.losses import SampleLosses, per_sample_token_mean_ce
from optsel.pipeline.engines import common
from optsel.pipeline.engines.base import Batch, Engine


class CausalLMEngine(Engine):
    """Shared verbs; subclasses set ``module``, ``optimizer``, ``scheduler``, ``device`` and
    ``empty_samples`` (a :class:`common.EmptySampleCounter`)."""

    def _backward(self, objective: torch.Tensor) -> None:
        """Backpropagate the scalar ``objective`` (DeepSpeed: through its engine)."""
        objective.backward()

    def _after_forward(self) -> None:
        """After a forward without backward (FSDP2: reshard the root)."""

    def _losses(self, batch: Batch) -> SampleLosses:
        inputs = common.model_inputs(batch, self.device)
        logits = self.module(**inputs, use_cache=False).logits
        return per_sample_token_mean_ce(logits, batch["labels"].to(self.device))

    def forward_backward(self, batch: Batch, sample_weights: torch.Tensor, loss_scale: float) -> torch.Tensor:
        weights = common.check_sample_weights(sample_weights, batch["input_ids"].shape[0])
        self.module.train()
        losses = self._losses(batch)
        self.empty_samples.check(losses, weights)
        self._backward(common.weighted_objective(losses.loss, weights, loss_scale))
        return losses.loss.detach().float().cpu()

    @torch.no_grad()
    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        try:
            return self._losses(batch).loss.float().cpu()
        finally:
            self._after_forward()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        was_training = self.module.training
        self.module.eval()
        try:
            return common.greedy_generate(self.module, input_ids, attention_mask, max_new_tokens, self.device)
        finally:
            self.module.train(was_training)
            self._after_forward()

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])
