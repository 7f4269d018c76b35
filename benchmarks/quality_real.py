"""The real-text quality grid: FTW and the baselines fine-tuning a pre-trained BPE Llama on SFT pairs from
the Python source on disk.

    python -m benchmarks.quality --cells real [--methods a,b] [--workers 2] [--out results/quality_real]
    optsel bench quality --cells real

The grid file's ``real`` section (``benchmarks/quality_grid.yaml``, written before any run) fixes the corpus
(:class:`~optsel.pipeline.data.pysource.PySourceConfig`: the stdlib, the target family), the tokenizer and base
model (:mod:`benchmarks.real_text`: both built here when missing, cached by content hash), the fine-tuning
settings, the cells and the run order. Per cell (clean target share, mismatched-pair share, budget k of N)
and seed, :func:`optsel.pipeline.data.pysource.mix` draws the stream and a disjoint held-out target set: the
first ``num_target`` of it are the target-aware selectors' target, the next ``num_eval`` the evaluation.
Each sample is tokenized as ``optsel prepare`` does (prompt + docstring + EOS, loss on the docstring and
EOS). The loop is :func:`benchmarks.quality_runs.run`, as in the synthetic grid.

Reported per run: target loss on the eval set, and from a greedy generation of ``max_new_tokens`` after each
eval prompt the first line's exact match and ROUGE-L F (``rouge-score``, no stemming) against the reference
docstring's first line; weight per kind, ESS and FTW's alignment per kind along training. The tables are
those of the synthetic grid (:mod:`benchmarks.quality_report`) with a ROUGE-L column.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from benchmarks import quality_report as report
from benchmarks.quality_runs import RunResult, Stream, resolved_options, run
from benchmarks.real_text import DEFAULT_CACHE, BaseSettings, build_base, build_tokenizer_folder
from optsel.config_loader import from_mapping
from optsel.losses import per_sample_token_mean_ce
from optsel.pipeline.data.collate import collate
from optsel.pipeline.data.pysource import Corpus, PySample, PySourceConfig, collect, mix
from optsel.pipeline.data.tokenizer import load_tokenizer
from optsel.pipeline.engines.shared import greedy_generate
from optsel.pipeline.files import jsonio
from optsel.pipeline.train.evaluate import _left_padded, split_prompt_answer
from optsel.selection.base import Batch

#: the stream's kinds, in kind-id order
KINDS = ("target", "corrupted", "distractor/pairs", "distractor/text")
EVAL_BATCH = 16
_CELL = re.compile(r"^real-t(\d\d)-c(\d\d)-k(\d+)$")


@dataclass(frozen=True)
class RealCell:
    """One real-text cell: the stream's clean-target and mismatched-pair shares and the budget k."""

    target_fraction: float
    corrupted_fraction: float
    budget: int

    @property
    def name(self) -> str:
        return (
            f"real-t{round(100 * self.target_fraction):02d}-c{round(100 * self.corrupted_fraction):02d}-k{self.budget}"
        )

    @staticmethod
    def parse(name: str) -> RealCell:
        m = _CELL.match(name)
        if m is None:
            raise ValueError(f"cells: {name!r} is not a real-text cell name (real-t<target %>-c<mismatched %>-k<k>)")
        return RealCell(int(m[1]) / 100, int(m[2]) / 100, int(m[3]))


@dataclass(kw_only=True)
class RealSettings:
    """The fine-tuning settings fixed across the real grid (the grid file's ``real.settings``)."""

    pool: int  #: N candidates per step
    steps: int
    eval_every: int
    num_target: int  #: held-out clean target samples the target-aware selectors see
    num_eval: int  #: held-out clean target samples for loss and the generation metrics
    max_new_tokens: int  #: greedy tokens generated after each eval prompt
    optimizer: dict[str, Any]
    seeds: list[int]


@dataclass
class RealGrid:
    """The ``real`` section, typed: corpus, base, settings, cells, methods (selectors or variant labels), run
    order and the variants (label → (method, options): a selector with options, e.g. two-stage FTW)."""

    source: dict[str, Any]
    base: BaseSettings
    settings: RealSettings
    cells: list[RealCell]
    methods: list[str]
    seed_blocks: list[list[int]]
    variants: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)

    def method_of(self, label: str) -> tuple[str, dict[str, Any]]:
        """(selector, options) of a method or variant label."""
        return self.variants.get(label, (label, {}))

    def source_config(self, cell: RealCell | None = None) -> PySourceConfig:
        """The corpus's config; with ``cell``: its mix (shares, and as many train records as the run reads)."""
        cfg = PySourceConfig(**self.source)
        if cell is None:
            return cfg
        return replace(
            cfg,
            target_fraction=cell.target_fraction,
            corrupted_fraction=cell.corrupted_fraction,
            num_train=self.settings.pool * self.settings.steps,
        )


def load_real_grid(path: Path) -> RealGrid:
    """The grid file's ``real`` section; an unknown key or a bad value is an error naming it."""
    grid = yaml.safe_load(path.read_text())
    if "real" not in grid:
        raise ValueError(f"{path}: no real section")
    sec = grid["real"]
    unknown = sorted(set(sec) - {"source", "base", "settings", "cells", "methods", "seed_blocks", "variants"})
    if unknown:
        raise ValueError(f"{path}: real: unknown keys {unknown}")
    source = dict(sec["source"])
    from_mapping(PySourceConfig, source, "real.source")  # a bad key or value fails here, named
    settings = from_mapping(RealSettings, dict(sec["settings"]), "real.settings")
    blocks = [list(b) for b in (sec.get("seed_blocks") or [settings.seeds])]
    if sorted(s for b in blocks for s in b) != sorted(settings.seeds):
        raise ValueError(f"real.seed_blocks: {blocks} must hold every seed of real.settings.seeds once")
    cells = [RealCell.parse(n) for n in sec["cells"]]
    if not {"random", "oracle"} <= set(sec["methods"]):
        raise ValueError("real.methods: random and oracle are needed for the gap closed")
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for label, spec in (sec.get("variants") or {}).items():
        if not isinstance(spec, dict) or set(spec) - {"method", "options"} or "method" not in spec:
            raise ValueError(f"real.variants.{label}: must be {{method: ..., options: {{...}}}}, got {spec!r}")
        if label in sec["methods"]:
            raise ValueError(f"real.variants.{label}: the label is also a method")
        options = dict(spec.get("options") or {})
        resolved_options(spec["method"], options, 1)  # a bad key or value fails here, named
        variants[str(label)] = (str(spec["method"]), options)
    return RealGrid(
        source=source,
        base=from_mapping(BaseSettings, dict(sec.get("base") or {}), "real.base"),
        settings=settings,
        cells=cells,
        methods=list(sec["methods"]),
        seed_blocks=blocks,
        variants=variants,
    )


# -- the stream --------------------------------------------------------------------------------------------
def encode(tok, samples: list[PySample], max_seq_len: int) -> Batch:
    """Tokenize as ``optsel prepare`` does (prompt + response + EOS; loss on response and EOS; cut to
    ``max_seq_len``) and collate; ``kind_id`` indexes :data:`KINDS`."""
    rows = []
    eos = int(tok.eos_token_id)
    for i, s in enumerate(samples):
        head = tok.encode(s.prompt, add_special_tokens=False)
        tokens = (head + tok.encode(s.response, add_special_tokens=False) + [eos])[:max_seq_len]
        if len(head) >= len(tokens):
            raise ValueError(f"{s.origin}: the prompt alone fills max_seq_len={max_seq_len}")
        rows.append({"tokens": tokens, "prompt_len": len(head), "sample_id": i, "kind_id": KINDS.index(s.kind)})
    return collate(rows, int(tok.pad_token_id))


@dataclass
class RealStream:
    """A cell's stream (:class:`Stream`), its eval set's reference first lines and the mix's kind counts."""

    stream: Stream
    references: list[str]
    kind_counts: dict[str, int]


def first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0].strip() if text.strip() else ""


def real_stream(grid: RealGrid, corpus: Corpus, tok, cell: RealCell, seed: int) -> RealStream:
    """The seeded mix of ``cell``: train stream, target batch and eval batches (held-out, disjoint)."""
    s = grid.settings
    train, val = mix(corpus, grid.source_config(cell), seed)
    need = s.num_target + s.num_eval
    if len(val) < need:
        raise ValueError(
            f"real.settings: num_target + num_eval = {need} held-out target samples are needed, the corpus "
            f"holds {len(val)} (raise source.val_fraction or widen source.target_prefixes)"
        )
    max_len = grid.base.max_seq_len
    target, held = val[: s.num_target], val[s.num_target : need]
    evals = [encode(tok, held[j : j + EVAL_BATCH], max_len) for j in range(0, len(held), EVAL_BATCH)]
    counts: dict[str, int] = {}
    for sample in train:
        counts[sample.kind] = counts.get(sample.kind, 0) + 1
    stream = Stream(encode(tok, train, max_len), encode(tok, target, max_len), evals, dict(enumerate(KINDS)))
    return RealStream(stream, [first_line(h.response) for h in held], counts)


# -- evaluation --------------------------------------------------------------------------------------------
class RealEvaluator:
    """Target loss (token-mean CE per sample, mean over samples) and the first generated line's exact match
    and ROUGE-L F against the reference docstring's first line, over a stream's eval batches."""

    def __init__(self, tok, batches: list[Batch], references: list[str], max_new_tokens: int):
        from rouge_score import rouge_scorer  # noqa: PLC0415 - a benchmark-only dependency

        self.tok, self.batches, self.references = tok, batches, references
        self.max_new_tokens = max_new_tokens
        self.scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)

    def generated_first_lines(self, model: torch.nn.Module, batch: Batch) -> list[str]:
        prompts, _ = split_prompt_answer(batch)
        ids, mask = _left_padded(prompts, int(self.tok.pad_token_id))
        out = greedy_generate(model, ids, mask, self.max_new_tokens, torch.device("cpu"))
        lines = []
        for row in out.tolist():
            eos = int(self.tok.eos_token_id)
            row = row[: row.index(eos)] if eos in row else row
            lines.append(first_line(self.tok.decode(row, skip_special_tokens=True)))
        return lines

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss_sum, hits, rouge, n = 0.0, 0, 0.0, 0
        try:
            refs = iter(self.references)
            for batch in self.batches:
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                loss_sum += float(per_sample_token_mean_ce(logits, batch["labels"]).loss.double().sum())
                for line in self.generated_first_lines(model, batch):
                    ref = next(refs)
                    hits += int(line == ref)
                    rouge += self.scorer.score(ref, line)["rougeL"].fmeasure if ref and line else 0.0
                    n += 1
        finally:
            model.train(was_training)
        return {"loss": loss_sum / max(n, 1), "exact_match": hits / max(n, 1), "rouge_l": rouge / max(n, 1)}


# -- the grid ----------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What every run of a grid shares: the corpus, the tokenizer folder and the base model's folder."""

    corpus: Corpus
    tokenizer_dir: Path
    base_dir: Path


def build_inputs(grid: RealGrid, cache: Path) -> Inputs:
    """The corpus (walked once), and the tokenizer and base built (or reused from ``cache``, by content hash)."""
    cache.mkdir(parents=True, exist_ok=True)
    corpus = collect(grid.source_config())
    tokenizer_dir, _ = build_tokenizer_folder(corpus, grid.base, cache)
    t0 = time.perf_counter()
    base_dir, built = build_base(corpus, tokenizer_dir, grid.base, cache)
    if built:
        print(f"[quality-real] base model pre-trained in {time.perf_counter() - t0:.0f} s: {base_dir}", flush=True)
    return Inputs(corpus, tokenizer_dir, base_dir)


def run_key(grid: RealGrid, inputs: Inputs, cell: RealCell, label: str, seed: int) -> str:
    """The stored run's key: everything that makes the run (a variant: its label and its resolved options)."""
    method, options = grid.method_of(label)
    budget = grid.settings.pool if method == "full" else cell.budget
    blob = json.dumps(
        [
            asdict(grid.settings),
            grid.source,
            asdict(grid.base),
            inputs.base_dir.name,
            asdict(cell),
            label,
            resolved_options(method, options, budget),
            seed,
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _job(args: tuple) -> list[dict]:
    """One (cell, seed): every method, reusing finished runs. Runs in a worker process."""
    grid, inputs, cell, seed, methods, run_dir, report_only, threads = args
    from transformers import AutoConfig, LlamaForCausalLM  # noqa: PLC0415 - heavy, worker-only

    torch.set_num_threads(threads)
    logging.getLogger("optsel").setLevel(logging.WARNING)
    tok = load_tokenizer(inputs.tokenizer_dir, key="real.base")
    config = AutoConfig.from_pretrained(inputs.base_dir)
    base: dict[str, torch.Tensor] = {}
    data: RealStream | None = None
    out = []
    for label in methods:
        method, options = grid.method_of(label)
        path = Path(run_dir) / cell.name / f"{label}_s{seed}_{run_key(grid, inputs, cell, label, seed)}.json"
        if path.is_file():
            out.append(json.loads(path.read_text()))
            continue
        if report_only:
            continue
        if data is None:
            data = real_stream(grid, inputs.corpus, tok, cell, seed)
            base = dict(LlamaForCausalLM.from_pretrained(inputs.base_dir).state_dict())
            evaluator = RealEvaluator(tok, data.stream.eval_batches, data.references, grid.settings.max_new_tokens)
        r = run(
            grid.settings,
            data.stream,
            base,
            method,
            options,
            label,
            cell,
            seed,
            probe_alignment=label == "ftw",
            make_model=lambda: LlamaForCausalLM(config),
            evaluator=evaluator,
        )
        record = {**vars(r), "kind_counts": data.kind_counts}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(jsonio.dumps(record))
        tmp.replace(path)
        print(
            f"[quality-real] {cell.name} {label:9s} seed {seed}: loss {r.final_loss:.4f} EM {r.final_em:.3f} "
            f"ROUGE-L {r.rouge_curve[max(r.rouge_curve)]:.3f} target w {r.precision.get('target', 0):.2f} "
            f"corrupted w {r.precision.get('corrupted', 0):.2f} ESS {r.ess:.1f} ({r.wall_seconds:.0f}s)",
            flush=True,
        )
        out.append(record)
    return out


def add_rouge(summary: dict[str, Any], runs: list[RunResult]) -> dict[str, Any]:
    """The cell summary's methods with their final ROUGE-L F (mean ± 95 % CI over seeds)."""
    for method, m in summary["methods"].items():
        values = [
            r.rouge_curve[max(r.rouge_curve)]
            for r in runs
            if r.cell == summary["cell"] and r.method == method and r.rouge_curve
        ]
        m["final_rouge_l"] = report.mean_ci(values) if values else (math.nan, math.nan)
    return summary


def markdown(summaries: list[dict[str, Any]], meta: dict[str, Any], runs: list[RunResult]) -> str:
    """Which runs the summary holds, the synthetic grid's tables, then per cell each method's ROUGE-L and
    weight on every kind, and FTW's alignment per kind along training."""
    lines = [
        report.markdown(summaries, meta),
        "## Runs held (seeds per cell and method)",
        "",
        report.coverage_markdown(runs, meta["cells"]),
        "## Generation and weight per kind",
        "",
    ]
    for s in summaries:
        lines += [
            f"### {s['cell']}",
            "",
            "| method | first-line ROUGE-L F | first-line EM | " + " | ".join(f"w on {k}" for k in KINDS) + " | ESS |",
            "|---|---|---|" + "---|" * len(KINDS) + "---|",
        ]
        for method, m in s["methods"].items():
            kinds = " | ".join(report._fmt(m["precision"].get(k, 0.0), 2) for k in KINDS)
            lines.append(
                f"| {method} | {report._pm(m['final_rouge_l'])} | {report._pm(m['final_em'], 2)} | {kinds} | "
                f"{report._fmt(m['ess'], 1)} |"
            )
        lines.append("")
    preview = [s for s in summaries if len(s["seeds"]) < 2 and {"random", "oracle"} <= set(s["methods"])]
    if preview:
        names = list(dict.fromkeys(m for s in preview for m in s["methods"]))
        lines += [
            "## Cells with fewer than 2 seeds: the point estimates (not valid under the rule: no CI)",
            "",
            "(L_random − L_method) / (L_random − L_oracle) of the final target loss on the seeds held; the oracle "
            "here spends the budget on the pool's clean targets and tops up at random when a pool holds fewer "
            "than k of them.",
            "",
            "| cell | seeds | " + " | ".join(names) + " |",
            "|---|---|" + "---|" * len(names),
        ]
        for s in preview:
            r, o = s["methods"]["random"]["final_loss"][0], s["methods"]["oracle"]["final_loss"][0]
            ms = s["methods"]
            gaps = [
                report._fmt((r - ms[m]["final_loss"][0]) / (r - o), 2) if m in ms and r != o else "—" for m in names
            ]
            lines.append(f"| {s['cell']} | {','.join(map(str, s['seeds']))} | " + " | ".join(gaps) + " |")
        lines.append("")
    table = report.alignment_by_kind(runs, "ftw")
    if table:
        lines += [
            "## FTW's alignment per kind along training",
            "",
            "Mean alignment b of each kind's pool samples in units of the step's mean |b|, mean ± 95 % CI over "
            "FTW's runs in all cells:",
            "",
            report.alignment_markdown(table),
        ]
    return "\n".join(lines) + "\n"


def main(args) -> dict[str, Any]:
    """``python -m benchmarks.quality --cells real ...``: the parsed arguments of benchmarks/quality.py."""
    grid = load_real_grid(Path(args.grid))
    if args.methods:
        wanted = args.methods.split(",")
        unknown = sorted(set(wanted) - set(grid.methods) - set(grid.variants))
        if unknown:
            raise SystemExit(
                f"--methods: unknown {unknown}; the real grid has methods {grid.methods} and variants "
                f"{sorted(grid.variants)}"
            )
        grid = replace(grid, methods=wanted)
    if args.variants or args.section or args.equal_compute or args.quick:
        raise SystemExit("--cells real: --variants, --section, --equal-compute and --quick do not apply")
    out = Path(args.out or "results/quality_real")
    if args.fresh:
        out = out / f"fresh-{time.strftime('%Y%m%d-%H%M%S')}"
    argv = " ".join(["python -m benchmarks.quality", *args.argv])
    return run_grid(grid, out, workers=args.workers, report_only=args.report_only, command=argv)


def run_grid(
    grid: RealGrid,
    out: Path,
    cache: Path = DEFAULT_CACHE,
    workers: int = 2,
    report_only: bool = False,
    command: str = "python -m benchmarks.quality --cells real",
) -> dict[str, Any]:
    """Every (cell, seed, method) not stored yet under ``out/runs``, then the summary, tables and plots."""
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    inputs = build_inputs(grid, cache)
    run_dir = out / "runs"
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    jobs = [
        (grid, inputs, cell, seed, grid.methods, str(run_dir), report_only, threads)
        for block in grid.seed_blocks
        for cell in grid.cells
        for seed in block
    ]
    if workers > 1:
        # a worker killed (e.g. out of memory) fails the grid with BrokenProcessPool instead of a hang; what
        # finished is stored and reused by the next call
        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
            records = [r for batch in pool.map(_job, jobs) for r in batch]
    else:
        records = [r for job in jobs for r in _job(job)]
    runs = [RunResult.from_record(d) for d in records]
    summaries = [
        add_rouge(report.cell_summary(c.name, [r for r in runs if r.cell == c.name]), runs) for c in grid.cells
    ]
    summaries = [
        {**s, "kind_counts": next((d["kind_counts"] for d in records if d["cell"] == s["cell"]), {})} for s in summaries
    ]
    pretrain_summary = json.loads((inputs.base_dir / "pretrain.json").read_text())
    meta = {
        "mode": "real text",
        "command": command,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "wall_seconds": time.perf_counter() - started,
        "run_seconds": sum(r.wall_seconds for r in runs),
        "workers": workers,
        "grid_file": "benchmarks/quality_grid.yaml (section real)",
        "cells": [c.name for c in grid.cells],
        "settings": asdict(grid.settings),
        "source": grid.source,
        "base": {"folder": inputs.base_dir.name, **pretrain_summary},
        "description": (
            f"Real text: the stdlib's functions as (signature → docstring) pairs; target family "
            f"{', '.join(grid.source['target_prefixes'])}; base Llama of {pretrain_summary['parameters'] / 1e6:.1f}M "
            f"parameters pre-trained on the non-target part ({pretrain_summary['steps']} steps, final loss "
            f"{pretrain_summary['loss_last']:.2f}); pool N = {grid.settings.pool}, {grid.settings.steps} steps."
        ),
    }
    (out / "README.md").write_text(markdown(summaries, meta, runs))
    report.write_csv(runs, out / "runs.csv")
    report.write_json(runs, summaries, meta, out / "summary.json")
    if runs:
        report.plots(runs, summaries, grid.cells[0].name, out)
    return {"overall": report.overall(summaries), "cells": summaries}
