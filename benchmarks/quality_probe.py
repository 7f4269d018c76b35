"""When can a gradient-alignment selector tell clean target samples from corrupted ones?

    python -m benchmarks.quality_probe [--cell t15-c25-lh-k8] [--seed 0] [--steps 0,10,30,60,90,120]

Fine-tunes the grid's base model with random selection on one cell (the trajectory every selector
starts from) and, at the given steps, scores 24 clean-target, 24 corrupted and 24 look-alike pool
samples against the target gradient with explicit per-sample gradients of every covered linear weight:
b_i = ⟨P g_i, g_V⟩ under several geometries (Adam's P as FTW uses it, P with its denominator floored
at the mean √v̂ of each layer, P = I; with and without the output layer). Reports, per step and
geometry, the AUC of b for clean vs corrupted (1 = every clean sample scores above every corrupted
one, 0.5 = no separation) and the mean b of each kind relative to the clean mean. Writes
``<out>/probe.md`` and ``probe.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.quality import GRID_FILE, _parse_cell, load_grid
from benchmarks.quality_runs import _optimizer, _train_on, build_stream, new_model, pretrain, synthetic_config, take
from optsel.losses import per_sample_token_mean_ce
from optsel.pipeline.engines.shared import OptimizerConfig
from optsel.pipeline.files import jsonio
from optsel.selection.capture import find_covered_layers


def per_sample_grads(model, batch, names) -> torch.Tensor:
    """[n, D] flattened gradients of each sample's token-mean loss over ``names`` (a loop: n is small)."""
    params = dict(model.named_parameters())
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        one = take(batch, torch.tensor([i]))
        logits = model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits
        loss = per_sample_token_mean_ce(logits, one["labels"]).loss.sum()
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double())
    return torch.stack(rows)


def auc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    return float((pos[:, None] > neg[None, :]).double().mean() + 0.5 * (pos[:, None] == neg[None, :]).double().mean())


def geometries(model, optimizer, names) -> dict[str, torch.Tensor]:
    """Flattened diagonal preconditioners over ``names``: adam (FTW's P), adam_floor, identity."""
    params = dict(model.named_parameters())
    adam, floor, ident = [], [], []
    for n in names:
        p = params[n]
        state, group = optimizer.state.get(p, {}), optimizer.param_groups[0]
        if state:
            step = int(state["step"])
            vhat = state["exp_avg_sq"].double() / (1 - group["betas"][1] ** step)
            root = vhat.sqrt()
            adam.append((1.0 / (root + group["eps"])).reshape(-1))
            floor.append((1.0 / (root.clamp(min=float(root.mean())) + group["eps"])).reshape(-1))
        else:
            adam.append(torch.ones(p.numel(), dtype=torch.float64))
            floor.append(torch.ones(p.numel(), dtype=torch.float64))
        ident.append(torch.ones(p.numel(), dtype=torch.float64))
    return {"adam": torch.cat(adam), "adam_floor": torch.cat(floor), "identity": torch.cat(ident)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cell", default="t15-c25-lh-k8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", default="0,10,30,60,90,120")
    parser.add_argument("--per-kind", type=int, default=24)
    parser.add_argument("--out", default="results/quality_probe")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    grid = load_grid(GRID_FILE, quick=False)
    settings = grid["settings_obj"]
    cell = _parse_cell(args.cell)
    stream = build_stream(
        settings,
        synthetic_config(settings, cell.target_fraction, cell.corrupted_fraction, cell.lookalike, settings.num_train),
        settings.stream_seed,
    )
    model = new_model(settings)
    model.load_state_dict(pretrain(settings))
    opt = OptimizerConfig(**settings.optimizer)
    optimizer = _optimizer(model, opt)
    names = [layer.name for layer in find_covered_layers(model).layers]
    head = [i for i, n in enumerate(names) if "lm_head" in n]
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    offsets = torch.tensor([0] + sizes).cumsum(0)
    head_mask = torch.ones(int(offsets[-1]), dtype=torch.bool)
    for i in head:
        head_mask[offsets[i] : offsets[i + 1]] = False
    kinds = {v: k for k, v in stream.kind_names.items()}
    like = grid["settings"]["target_task"]
    from optsel.pipeline.data.synthetic import look_alike

    probe_kinds = ["target", "corrupted", f"distractor/{look_alike(like)}"]
    tail = stream.train["kind_id"][-2000:]
    rows = {
        k: (tail == kinds[k]).nonzero().flatten()[: args.per_kind] + (stream.train["kind_id"].numel() - 2000)
        for k in probe_kinds
    }
    probe = take(stream.train, torch.cat([rows[k] for k in probe_kinds]))
    labels = sum(([k] * rows[k].numel() for k in probe_kinds), [])
    order = torch.randperm(stream.train["input_ids"].shape[0], generator=torch.Generator().manual_seed(args.seed))
    wanted = sorted(int(s) for s in args.steps.split(","))
    gen = torch.Generator().manual_seed(args.seed)
    results = []
    model.train()
    for step in range(max(wanted) + 1):
        if step in wanted:
            G = per_sample_grads(model, probe, names)
            gV = per_sample_grads(model, stream.target, names).mean(0)
            for geo, P in geometries(model, optimizer, names).items():
                for scope, mask in (("all layers", None), ("no lm_head", head_mask)):
                    b = (G * (P * gV)) if mask is None else (G[:, mask] * (P[mask] * gV[mask]))
                    b = b.sum(1)
                    by = {k: b[[i for i, lab in enumerate(labels) if lab == k]] for k in probe_kinds}
                    ref = float(by["target"].mean()) or 1.0
                    results.append(
                        {
                            "step": step,
                            "geometry": geo,
                            "scope": scope,
                            "auc_clean_vs_corrupted": auc(by["target"], by["corrupted"]),
                            "auc_clean_vs_lookalike": auc(by["target"], by[probe_kinds[2]]),
                            **{f"mean_b/{k}": float(by[k].mean()) / ref for k in probe_kinds},
                        }
                    )
            print(f"[probe] step {step} done ({time.perf_counter() - started:.0f}s)", flush=True)
        if step == max(wanted):
            break
        rows_step = order[torch.arange(step * settings.pool, (step + 1) * settings.pool) % order.numel()]
        pool = take(stream.train, rows_step)
        pick = torch.randperm(settings.pool, generator=gen)[: cell.budget]
        _train_on(
            model, optimizer, take(pool, pick), torch.full((cell.budget,), 1.0 / cell.budget), opt, step, settings.steps
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(jsonio.dumps({"cell": args.cell, "seed": args.seed, "rows": results}))
    lines = [
        f"# Alignment probe — {args.cell}, seed {args.seed}",
        "",
        f"Command: `python -m benchmarks.quality_probe {' '.join(argv if argv is not None else sys.argv[1:])}` — "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {(time.perf_counter() - started) / 60:.1f} min.",
        "",
        f"Random-selection trajectory; {args.per_kind} pool samples per kind; b_i = ⟨P g_i, g_V⟩ from explicit "
        "per-sample gradients (no momentum term). AUC: share of (clean, corrupted) pairs ordered correctly.",
        "",
        "| step | geometry | scope | AUC clean vs corrupted | AUC clean vs look-alike | mean b corrupted / clean | "
        "mean b look-alike / clean |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['step']} | {r['geometry']} | {r['scope']} | {r['auc_clean_vs_corrupted']:.2f} | "
            f"{r['auc_clean_vs_lookalike']:.2f} | {r['mean_b/corrupted']:.2f} | "
            f"{r[f'mean_b/{probe_kinds[2]}']:.2f} |"
        )
    (out / "probe.md").write_text("\n".join(lines) + "\n")
    print((out / "probe.md").read_text())
    return {"rows": results}


if __name__ == "__main__":
    main()
