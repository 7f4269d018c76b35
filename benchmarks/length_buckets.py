"""What padding costs FTW on real SFT pools, and what length-sorted capture passes give back.

``python -m benchmarks.length_buckets`` (settings below, fixed before the first run). On the real-text
grid's stream (benchmarks/quality_real.py: stdlib docstring SFT, its BPE and base model, built when
missing; cell real-t05-c25-k4, seed 0, N = 32, k = 4, |V| = 32), for ``STEPS`` consecutive pools:
each method's select + train step, counted FLOPs (torch.utils.flop_counter: matmul + attention, as
benchmarks/speed.py) and wall time, against the plain step on the k rows a method trains on — random's
step, its batch cut to its own longest row as a dataloader of k would pad it. FTW's rows: the default
(one pass over the pool padded to its longest row) and ``capture_chunk_tokens`` (length-sorted passes,
each cut to its longest row), one and two stages. Same model state for every method (the base); the
selection is the same with and without the token budget (checked: same indices every step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

CELL, SEED, STEPS, TOKENS = "real-t05-c25-k4", 0, 3, 2048  #: 2048 = 4 × the stream's max_seq_len (512)
METHODS: list[tuple[str, str, dict]] = [
    ("random (plain step on k)", "random", {}),
    ("ftw default (one pass over the padded pool)", "ftw", {}),
    (f"ftw, capture_chunk_tokens {TOKENS}", "ftw", {"capture_chunk_tokens": TOKENS}),
    ("ftw two-stage: head → exact on 2k", "ftw", {"prefilter": "head", "filter_size": 8}),
    (
        f"ftw two-stage, capture_chunk_tokens {TOKENS}",
        "ftw",
        {"prefilter": "head", "filter_size": 8, "capture_chunk_tokens": TOKENS},
    ),
]


def trim(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rows cut to their own longest (right-padded batches)."""
    width = max(1, int(batch["attention_mask"].sum(1).max()))
    return {k: v[:, :width] if v.dim() == 2 else v for k, v in batch.items()}


def measure(threads: int = 2) -> dict:
    from transformers import AutoConfig, LlamaForCausalLM

    from benchmarks.quality_real import build_inputs, load_real_grid, real_stream
    from benchmarks.quality_runs import _optimizer, _step_flops, _train_on, build_selector, take
    from benchmarks.real_text import DEFAULT_CACHE
    from optsel.pipeline.data.tokenizer import load_tokenizer
    from optsel.pipeline.engines.shared import OptimizerConfig

    torch.set_num_threads(threads)
    grid = load_real_grid(Path(__file__).resolve().parent / "quality_grid.yaml")
    cell = next(c for c in grid.cells if c.name == CELL)
    inputs = build_inputs(grid, DEFAULT_CACHE)
    tok = load_tokenizer(inputs.tokenizer_dir, key="real.base")
    data = real_stream(grid, inputs.corpus, tok, cell, SEED)
    config = AutoConfig.from_pretrained(inputs.base_dir)
    base = dict(LlamaForCausalLM.from_pretrained(inputs.base_dir).state_dict())
    opt = OptimizerConfig(**grid.settings.optimizer)
    n, k = grid.settings.pool, cell.budget
    pools = [take(data.stream.train, torch.arange(s * n, (s + 1) * n)) for s in range(STEPS)]
    rows: dict[str, dict] = {}
    picked: dict[str, list[list[int]]] = {}
    for label, method, options in METHODS:
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config)
        model.load_state_dict(base)
        optimizer = _optimizer(model, opt)
        selector = build_selector(method, options, model, optimizer, k, SEED, data.stream.kind_names)
        flops, seconds, chosen = 0, 0.0, []
        for step, pool in enumerate(pools):
            model.load_state_dict(base)  # every step from the same state: the pools, not the training, differ

            def one(pool=pool, step=step):
                target = data.stream.target if getattr(selector, "needs_target", False) else None
                sel = selector.select(pool, target)
                batch = trim(take(pool, sel.indices))
                _train_on(model, optimizer, batch, sel.weights.float(), opt, step, STEPS, sel.pool_pass, sel.indices)
                return sel

            t0 = time.perf_counter()
            sel, counted = _step_flops(one)
            seconds += time.perf_counter() - t0
            flops += counted
            chosen.append(sorted(sel.indices.tolist()))
        rows[label] = {"flops": flops / STEPS, "seconds": seconds / STEPS}
        picked[label] = chosen
    ref = rows[METHODS[0][0]]
    for r in rows.values():
        r["flop_ratio"], r["time_ratio"] = r["flops"] / ref["flops"], r["seconds"] / ref["seconds"]
    lengths = [p["attention_mask"].sum(1).float() for p in pools]
    return {
        "rows": rows,
        "same_selection": {
            "one stage": picked[METHODS[1][0]] == picked[METHODS[2][0]],
            "two stage": picked[METHODS[3][0]] == picked[METHODS[4][0]],
        },
        "pool_mean_over_max_length": sum(float(x.mean() / x.max()) for x in lengths) / len(lengths),
        "settings": {"cell": CELL, "seed": SEED, "steps": STEPS, "tokens": TOKENS, "N": n, "k": k},
    }


def markdown(res: dict) -> str:
    lines = [
        "| method | GFLOP / step | FLOPs / plain step on k | time / plain step on k |",
        "|---|---|---|---|",
    ]
    for label, r in res["rows"].items():
        lines.append(f"| {label} | {r['flops'] / 1e9:.1f} | {r['flop_ratio']:.2f} | {r['time_ratio']:.2f} |")
    lines += [
        "",
        f"Pools' mean / longest row length: {res['pool_mean_over_max_length']:.2f}. Same selection with the token "
        f"budget: one stage {res['same_selection']['one stage']}, two stages {res['same_selection']['two stage']}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/length_buckets")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    res = measure(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    md = "# Length-sorted capture passes on real SFT pools\n\nCommand: `python -m benchmarks.length_buckets`. "
    md += __doc__.split("\n\n")[1].replace("\n", " ") + "\n\n" + markdown(res) + "\n"
    (out / "length_buckets.md").write_text(md)
    (out / "length_buckets.json").write_text(json.dumps(res, indent=1))
    print(md)
    return res


if __name__ == "__main__":
    main()
