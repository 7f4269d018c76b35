"""One quality-benchmark run: an in-memory stream of one grid cell, the pre-trained base model, and
a fine-tuning loop that drives a selector through the public Selector API.

The loop is the "in your own loop" use of the README: a plain single-process model with
``torch.optim.AdamW`` (or Muon + AdamW: ``optimizer.name: muon``, the Muon grid), the selector built from
the registry exactly as the Trainer builds it, the
loss ``Σ_i w_i ℓ_i`` over the chosen samples with the per-sample token-mean CE the engines use, the
engines' LR schedule and gradient clipping, and ``pipeline.evaluate.evaluate`` for target loss and
exact match. It skips MDS, streaming and the engines so that a grid of hundreds of runs fits 2 CPU
cores; the Trainer path of every selector is covered by the end-to-end tests.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from optsel.losses import per_sample_token_mean_ce
from optsel.pipeline.data import synthetic
from optsel.pipeline.data.collate import collate
from optsel.pipeline.data.tokenizer import byte_tokenizer
from optsel.pipeline.engines.shared import OptimizerConfig, greedy_generate, lr_factor
from optsel.pipeline.train.evaluate import evaluate
from optsel.pipeline.train.model import ModelConfig, build_model
from optsel.pipeline.train.trainer import subset
from optsel.selection.base import Batch, get_selector_factory
from optsel.selection.stats import selection_metrics


@dataclass(frozen=True)
class Cell:
    """One grid cell: the stream's mix and the budget. name e.g. ``t15-c25-lh-k8``."""

    target_fraction: float
    corrupted_fraction: float
    lookalike: str  # "heavy" | "absent"
    budget: int

    @property
    def name(self) -> str:
        return (
            f"t{round(100 * self.target_fraction):02d}-c{round(100 * self.corrupted_fraction):02d}-"
            f"l{self.lookalike[0]}-k{self.budget}"
        )


@dataclass(kw_only=True)
class Settings:
    """Everything fixed across the grid (read from the grid file)."""

    target_task: str
    distractors: list[str]  # the look-alike is added (heavy) or left out (absent) per cell
    lookalike_share: float  # share of the distractor mass on the look-alike when "heavy"
    model: dict[str, Any]
    pool: int
    steps: int
    eval_every: int
    num_eval: int
    num_target: int
    num_train: int
    optimizer: dict[str, Any]
    pretrain_steps: int
    pretrain_batch: int
    pretrain_target_fraction: float
    seeds: list[int]
    max_new_tokens: int = 8
    stream_seed: int = 0


class RunSettings(Protocol):
    """What :func:`run` reads of a grid's settings (the synthetic ``Settings``, the real-text ``RealSettings``)."""

    pool: int
    steps: int
    eval_every: int
    max_new_tokens: int
    optimizer: dict[str, Any]


class RunCell(Protocol):
    """What :func:`run` reads of a grid cell (the synthetic :class:`Cell`, the real-text ``RealCell``)."""

    @property
    def name(self) -> str: ...

    @property
    def budget(self) -> int: ...


#: a model's scores on a stream's eval set: {"loss", "exact_match"} and optionally "rouge_l"
Evaluator = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class Stream:
    """A cell's tokenized train stream and its held-out target / eval batches (all in memory)."""

    train: Batch
    target: Batch
    eval_batches: list[Batch]
    kind_names: dict[int, str]


def _encode(tok, samples: list[dict[str, str]], kind_ids: dict[str, int]) -> Batch:
    """Byte-tokenize like ``optsel prepare`` (prompt + answer + EOS) and collate like the stream: loss on
    answer and EOS only (``pipeline.collate.collate``)."""
    rows = []
    for i, s in enumerate(samples):
        head = tok.encode(s["prompt"], add_special_tokens=False)
        tokens = head + tok.encode(s["answer"], add_special_tokens=False) + [int(tok.eos_token_id)]
        rows.append({"tokens": tokens, "prompt_len": len(head), "sample_id": i, "kind_id": kind_ids[s["kind"]]})
    return collate(rows, int(tok.pad_token_id))


def take(batch: Batch, rows: torch.Tensor) -> Batch:
    """Rows of a batch, trimmed to the longest kept sample (the trainer's ``subset``)."""
    return subset(batch, rows)


def synthetic_config(
    settings: Settings, target_fraction: float, corrupted_fraction: float, lookalike: str, num_train: int
) -> synthetic.SyntheticConfig:
    like = synthetic.look_alike(settings.target_task)
    others = [d for d in settings.distractors if d != like]
    if lookalike == "heavy":
        names = [like] + others
        weights = [settings.lookalike_share] + [(1 - settings.lookalike_share) / len(others)] * len(others)
    elif lookalike == "absent":
        names, weights = others, None
    else:
        raise ValueError(f"lookalike: must be 'heavy' or 'absent', got {lookalike!r}")
    return synthetic.SyntheticConfig(
        num_train=num_train,
        num_val=settings.num_target + settings.num_eval,
        target_task=settings.target_task,
        target_fraction=target_fraction,
        corrupted_fraction=corrupted_fraction,
        distractors=names,
        distractor_weights=weights,
    )


def build_stream(settings: Settings, cfg: synthetic.SyntheticConfig, seed: int) -> Stream:
    tok = byte_tokenizer()
    train, val = synthetic.generate(cfg, seed)
    kind_ids = {name: i for i, name in enumerate(cfg.kind_names())}
    t = settings.num_target
    target = _encode(tok, val[:t], kind_ids) if t else {}
    evals = [_encode(tok, val[t + j : t + j + 48], kind_ids) for j in range(0, len(val) - t, 48)]
    return Stream(_encode(tok, train, kind_ids), target, evals, {v: k for k, v in kind_ids.items()})


def new_model(settings: Settings) -> torch.nn.Module:
    tok = byte_tokenizer()
    return build_model(
        ModelConfig(**settings.model),
        vocab_size=len(tok),
        pad_id=int(tok.pad_token_id),
        bos_id=tok.bos_token_id,
        eos_id=int(tok.eos_token_id),
    )


class _PlainEngine:
    """What ``pipeline.evaluate.evaluate`` needs of an engine, for a plain module on the CPU."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @torch.no_grad()
    def per_sample_loss(self, batch: Batch) -> torch.Tensor:
        logits = self.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return per_sample_token_mean_ce(logits, batch["labels"]).loss

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        return greedy_generate(self.module, ids, mask, max_new_tokens, torch.device("cpu"))


def _optimizer(model: torch.nn.Module, opt: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW, or Muon + AdamW for ``name: muon`` (pipeline/engines/muon.py, the engines' own builder); each
    group keeps its peak lr as ``base_lr`` for the schedule."""
    from optsel.pipeline.engines.muon import build_optimizer

    optimizer = build_optimizer(model, [p for p in model.parameters() if p.requires_grad], opt)
    for group in optimizer.param_groups:
        group["base_lr"] = float(group["lr"])
    return optimizer


def _train_on(
    model,
    optimizer,
    batch: Batch,
    weights: torch.Tensor,
    opt: OptimizerConfig,
    step: int,
    total: int,
    pool_pass=None,
    rows: torch.Tensor | None = None,
) -> float:
    """One optimizer step on Σ w_i ℓ_i: from FTW's single pass (``pool_pass`` and the pool ``rows``) when
    given, as the trainer does, else a forward/backward over ``batch``. The schedule scales each group's
    peak lr (AdamW's lr, Muon's muon_lr)."""
    for group in optimizer.param_groups:
        group["lr"] = group.get("base_lr", opt.lr) * lr_factor(step, opt, total)
    optimizer.zero_grad(set_to_none=True)
    if pool_pass is not None:
        pool_pass.accumulate_into_grads(rows, weights)
        loss = (weights.to(pool_pass.loss.dtype) * pool_pass.loss[pool_pass.pass_rows(rows, weights)]).sum()
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses = per_sample_token_mean_ce(logits, batch["labels"]).loss
        loss = (weights.to(losses.dtype) * losses).sum()
        loss.backward()
    if opt.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), opt.grad_clip)
    optimizer.step()
    return float(loss.detach())


def pretrain(settings: Settings) -> dict[str, torch.Tensor]:
    """The base model: ``pretrain_steps`` of plain training on a general stream (the distractor tasks,
    look-alike included, plus ``pretrain_target_fraction`` clean target samples), seeded by stream_seed."""
    like = synthetic.look_alike(settings.target_task)
    names = [like] + [d for d in settings.distractors if d != like]
    cfg = synthetic.SyntheticConfig(
        num_train=settings.pretrain_steps * settings.pretrain_batch,
        num_val=0,
        target_task=settings.target_task,
        target_fraction=settings.pretrain_target_fraction,
        corrupted_fraction=0.0,
        distractors=names,
    )
    stream = build_stream(dataclasses.replace(settings, num_eval=0, num_target=0), cfg, 1000 + settings.stream_seed)
    torch.manual_seed(settings.stream_seed)
    model = new_model(settings)
    # AdamW whatever the fine-tuning optimizer: the Muon grid starts from the default grid's base model
    opt = OptimizerConfig(**{**settings.optimizer, "warmup_steps": 10, "schedule": "cosine", "name": "adamw"})
    optimizer = _optimizer(model, opt)
    b = settings.pretrain_batch
    model.train()
    for step in range(settings.pretrain_steps):
        rows = torch.arange(step * b, (step + 1) * b)
        _train_on(
            model, optimizer, take(stream.train, rows), torch.full((b,), 1.0 / b), opt, step, settings.pretrain_steps
        )
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


#: RunResult's maps keyed by step
STEP_MAPS = ("curve", "em_curve", "rouge_curve", "seconds", "alignment_by_kind", "flops")


@dataclass
class RunResult:
    method: str
    cell: str
    seed: int
    curve: dict[int, float] = field(default_factory=dict)  # step -> target val loss
    em_curve: dict[int, float] = field(default_factory=dict)  # step -> exact match
    rouge_curve: dict[int, float] = field(default_factory=dict)  # step -> ROUGE-L F (real-text grid only)
    seconds: dict[int, float] = field(default_factory=dict)  # step -> cumulative select + train seconds
    precision: dict[str, float] = field(default_factory=dict)  # kind -> mean share of the step's weight
    ess: float = 0.0
    selected: float = 0.0
    fallbacks: dict[str, float] = field(default_factory=dict)
    alignment_by_kind: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> kind -> mean b/‖b‖
    wall_seconds: float = 0.0
    flops: dict[int, float] = field(default_factory=dict)  # step -> cumulative counted FLOPs (count_flops runs)
    steps: int = 0

    @classmethod
    def from_record(cls, d: dict) -> RunResult:
        """A run back from its stored JSON record (``vars(run)``, perhaps with extra keys, which are dropped;
        JSON keys of the step maps are strings)."""
        kept = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        for name in STEP_MAPS:
            kept[name] = {int(k): v for k, v in kept.get(name, {}).items()}
        return cls(**kept)

    @property
    def final_loss(self) -> float:
        return self.curve[max(self.curve)]

    @property
    def final_em(self) -> float:
        return self.em_curve[max(self.em_curve)]


def resolved_options(method: str, options: dict, budget: int) -> dict:
    """The selector's typed config as it will run (defaults filled in), so a changed default is a new run; FTW keys
    added after runs were stored are left out at their default (``ftw_config.LATE_KEYS``)."""
    from optsel.config_loader import from_mapping, to_plain
    from optsel.selection.base import get_selector_factory
    from optsel.selection.ftw_config import LATE_KEYS, FTWConfig

    config_class = getattr(get_selector_factory(method), "config_class", None)
    if config_class is None:
        return dict(options)
    resolved = to_plain(from_mapping(config_class, {"budget": budget, **options}, f"options.{method}"))
    if issubclass(config_class, FTWConfig):  # keys added later, at their default: left out (ftw_config.LATE_KEYS)
        defaults = {f.name: f.default for f in dataclasses.fields(FTWConfig)}
        resolved = {k: v for k, v in resolved.items() if not (k in LATE_KEYS and v == defaults[k])}
    return resolved


def build_selector(
    method: str, options: dict[str, Any], model, optimizer, budget: int, seed: int, kind_names: dict[int, str]
):
    """The selector as the Trainer builds it: registry factory + typed options (validated, key named)."""
    from optsel.config_loader import from_mapping

    factory = get_selector_factory(method)
    kwargs: dict[str, Any] = dict(model=model, optimizer=optimizer, budget=budget, seed=seed, kind_names=kind_names)
    config_class = getattr(factory, "config_class", None)
    if config_class is not None:
        kwargs["config"] = from_mapping(config_class, {"budget": budget, **options}, f"options.{method}")
    elif options:
        raise ValueError(f"options.{method}: selector {method!r} takes no options, got {sorted(options)}")
    return factory(**kwargs)


def _step_flops(fn) -> tuple[Any, int]:
    """(fn(), its counted matmul + attention FLOPs): benchmarks/speed.py's counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.speed import _attention_flops

    with FlopCounterMode(display=False, custom_mapping=_attention_flops()) as counter:
        out = fn()
    return out, int(counter.get_total_flops())


def run(
    settings: RunSettings,
    stream: Stream,
    base: dict[str, torch.Tensor],
    method: str,
    options: dict[str, Any],
    label: str,
    cell: RunCell,
    seed: int,
    probe_alignment: bool = False,
    steps: int | None = None,
    count_flops: bool = False,
    make_model: Callable[[], torch.nn.Module] | None = None,
    evaluator: Evaluator | None = None,
) -> RunResult:
    """Fine-tune the base on ``stream`` with one selector; ``seed`` fixes the stream order and RNGs (paired).
    ``steps``: instead of ``settings.steps`` (the learning-rate schedule spans them; the equal-compute
    view); ``count_flops``: count every step's select + train FLOPs into ``RunResult.flops``.
    ``make_model`` / ``evaluator``: the real-text grid's model (an uninitialised copy of its base) and eval
    (loss, exact match and ROUGE-L of the first line); default the synthetic grid's."""
    total = int(steps or settings.steps)
    started = time.perf_counter()
    torch.manual_seed(seed)
    if make_model is None:
        assert isinstance(settings, Settings), "the synthetic model needs the synthetic grid's Settings"
        model = new_model(settings)
    else:
        model = make_model()
    model.load_state_dict(base)
    opt = OptimizerConfig(**settings.optimizer)
    optimizer = _optimizer(model, opt)
    n = settings.pool
    budget = n if method == "full" else cell.budget
    selector = build_selector(method, options, model, optimizer, budget, seed, stream.kind_names)
    needs_target = getattr(selector, "needs_target", False)
    num = stream.train["input_ids"].shape[0]
    order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    engine = _PlainEngine(model)
    result = RunResult(method=label, cell=cell.name, seed=seed)
    sums: dict[str, float] = {}
    fallbacks: dict[str, float] = {}
    ess = selected = elapsed = flops = 0.0

    def record_eval(step: int) -> None:
        if evaluator is None:
            ev = evaluate(engine, stream.eval_batches, settings.max_new_tokens, 0, 2)
            scores = {"loss": ev.loss, "exact_match": ev.exact_match}
        else:
            scores = evaluator(model)
        result.curve[step], result.em_curve[step], result.seconds[step] = scores["loss"], scores["exact_match"], elapsed
        if "rouge_l" in scores:
            result.rouge_curve[step] = scores["rouge_l"]
        if count_flops:
            result.flops[step] = flops
        model.train()

    def one_step(pool: Batch, step: int):
        sel = selector.select(pool, stream.target if needs_target else None)
        _train_on(
            model, optimizer, take(pool, sel.indices), sel.weights.float(), opt, step, total, sel.pool_pass, sel.indices
        )
        # the single pass's activations and output gradients are spent: free them before the next select (as
        # the trainer does by dropping the step's Selection), not after it; a 14M-parameter model at N = 32
        # peaks at ~8.5 GB instead of ~13 GB
        sel.pool_pass = None
        return sel

    record_eval(0)
    model.train()
    for step in range(total):
        rows = order[torch.arange(step * n, (step + 1) * n) % num]
        pool = take(stream.train, rows)
        t0 = time.perf_counter()
        if count_flops:
            sel, counted = _step_flops(lambda: one_step(pool, step))
            flops += counted
        else:
            sel = one_step(pool, step)
        elapsed += time.perf_counter() - t0
        m = selection_metrics(sel, pool["kind_id"], stream.kind_names)
        for key, value in m.items():
            if key.startswith("select/precision/"):
                kind = key.removeprefix("select/precision/")
                sums[kind] = sums.get(kind, 0.0) + value
            elif key.startswith("select/fallback/"):
                fallbacks[key.removeprefix("select/fallback/")] = fallbacks.get(key, 0.0) + value
        ess += m["select/ess"]
        selected += m["select/selected"]
        if probe_alignment and sel.alignment is not None and (step % settings.eval_every == 0):
            b = sel.alignment.double()
            scale = float(b.abs().mean()) or 1.0
            result.alignment_by_kind[step] = {
                stream.kind_names[int(c)]: float(b[pool["kind_id"] == c].mean() / scale)
                for c in pool["kind_id"].unique()
            }
        if (step + 1) % settings.eval_every == 0 or step + 1 == total:
            record_eval(step + 1)
    result.steps = total
    done = max(total, 1)
    result.precision = {k: v / done for k, v in sums.items()}
    result.ess, result.selected, result.fallbacks = ess / done, selected / done, fallbacks
    result.wall_seconds = time.perf_counter() - started
    return result
