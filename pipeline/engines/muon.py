"""``optimizer.name: muon``: torch.optim.Muon on the hidden 2-D weight matrices, torch.optim.AdamW on the rest.

The usual hybrid split (:func:`split_muon_params`): Muon takes every trainable 2-D parameter except the
embedding tables (every ``nn.Embedding``) and the output layer (``get_output_embeddings``'s weight,
tied or not); embeddings, the head, norms and biases stay on AdamW. ``optimizer.muon_params``
(fnmatch patterns of parameter names) replaces the rule: exactly the matching 2-D parameters go to Muon.

:class:`MuonAdamW` is the pair as one ``torch.optim.Optimizer`` (so the LR scheduler, gradient clipping
and ``torch.distributed.checkpoint`` see a single optimizer): the real torch.optim.Muon and AdamW run
their own ``step`` on shared param groups and a shared state (the approach of DeepSpeed's
MuonWithAuxAdam). Each group carries ``use_muon``. torch's Muon runs on FSDP2's ``Shard(0)`` DTensors as
they are (DTensor redistributes each matrix for Newton–Schulz, one parameter at a time; exact against
the unsharded step in float64, tests/e2e/test_muon_engines.py).
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:  # shared.py's configs; the engines import this module lazily
    from optsel.pipeline.engines.shared import OptimizerConfig

#: why engine deepspeed refuses optimizer.name muon (docs/design.md#muon-geometry)
MUON_REFUSAL = (
    "optimizer.name: 'muon' does not run on engine 'deepspeed': DeepSpeed 0.19.8's ZeRO-3 Muon "
    '(MuonWithAuxAdam: "optimizer": {"type": "muon"} in the DeepSpeed JSON, parameters tagged '
    "use_muon) runs its own Newton–Schulz kernels (by default 'gram', in fp16; no adjust_lr_fn) rather "
    "than torch.optim.Muon's, and keeps the momentum in ZeRO-3's flat partitions, which FTW's Muon geometry does not read; use "
    "engine.name=fsdp2 (torch.optim.Muon on its Shard(0) DTensors)"
)


def split_muon_params(
    model: nn.Module, patterns: list[str] | None = None
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon params, AdamW params) of ``model``'s trainable parameters (module docstring's rule)."""
    excluded = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}  # token and position tables
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        weight = getattr(module, "weight", None)
        if weight is not None:
            excluded.add(id(weight))
    muon: list[nn.Parameter] = []
    adam: list[nn.Parameter] = []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if patterns is not None:
            hidden = p.ndim == 2 and any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        else:
            hidden = p.ndim == 2 and id(p) not in excluded
        (muon if hidden else adam).append(p)
    return muon, adam


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on ``muon_params`` and torch.optim.AdamW on ``adam_params`` as one optimizer
    (module docstring). ``optimizers``: the two inner optimizers (read by selection/muon_geometry.py)."""

    def __init__(
        self,
        muon_params: list[nn.Parameter],
        adam_params: list[nn.Parameter],
        *,
        muon: dict[str, Any],
        adamw: dict[str, Any],
    ):
        if not muon_params:
            raise ValueError(
                "optimizer.name: 'muon' found no 2-D weight matrix for Muon (optimizer.muon_params "
                "selects them by name)"
            )
        self._muon = torch.optim.Muon(muon_params, **muon)
        self._adamw = torch.optim.AdamW(adam_params, **adamw) if adam_params else None
        # AdamW's groups first: the engine's ``lr()`` (the scheduler's first group) stays optimizer.lr's
        groups = (list(self._adamw.param_groups) if self._adamw else []) + list(self._muon.param_groups)
        for g in self._muon.param_groups:
            g["use_muon"] = True
        for g in self._adamw.param_groups if self._adamw else []:
            g["use_muon"] = False
        super().__init__(groups, {})
        self._link()

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._muon] + ([self._adamw] if self._adamw is not None else [])

    def _link(self) -> None:
        """Point the inner optimizers at this one's groups and state (after init and every load)."""
        self._muon.param_groups = [g for g in self.param_groups if g["use_muon"]]
        self._muon.state = self.state
        if self._adamw is not None:
            self._adamw.param_groups = [g for g in self.param_groups if not g["use_muon"]]
            self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()


def build_optimizer(model: nn.Module, params: list[nn.Parameter], optim: OptimizerConfig) -> torch.optim.Optimizer:
    """The run's optimizer over ``params`` (``optimizer`` block; pipeline/engines/shared.py's OptimizerConfig):
    AdamW, or :class:`MuonAdamW` for ``name: muon``."""
    adamw: dict[str, Any] = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, weight_decay=optim.weight_decay)
    if getattr(optim, "name", "adamw") != "muon":
        return torch.optim.AdamW(params, **adamw)
    wanted = {id(p) for p in params}
    muon_params, adam_params = split_muon_params(model, optim.muon_params)
    muon_params = [p for p in muon_params if id(p) in wanted]
    adam_params = [p for p in adam_params if id(p) in wanted]
    muon = dict(
        lr=optim.muon_lr,
        momentum=optim.muon_momentum,
        nesterov=optim.muon_nesterov,
        weight_decay=optim.weight_decay if optim.muon_weight_decay is None else optim.muon_weight_decay,
        adjust_lr_fn=optim.muon_adjust_lr_fn,
    )
    return MuonAdamW(muon_params, adam_params, muon=muon, adamw=adamw)


__all__ = ["MUON_REFUSAL", "MuonAdamW", "build_optimizer", "split_muon_params"]
