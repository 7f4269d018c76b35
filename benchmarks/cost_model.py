"""Cost model: FTW's selector bytes per step against ZeRO-3's and FSDP2's own, for Llama 1B / 8B / 70B shapes.

    python -m benchmarks.cost_model [--out results/cost_model]

Analytic (nothing is run): per covered layer, selection/cost_model.py's ``layer_cost`` with the backend
``gram: auto`` would pick (``choose_backend``: the same code FTW runs), summed over the model's covered
linear layers, plus the per-step terms that do not depend on a layer. Per rank, per optimizer step,
payload convention of optsel.distributed.CommCounter (all-gather = the gathered output, reduce-scatter
= the full input, all-reduce = the tensor); ring algorithms send payload × (R − 1)/R for both the
engines' all-gathers / reduce-scatters and the selector's all-gathers, so the ratios hold on the wire too.

Assumptions (stated in the output): bf16 parameters on the wire for the engines, gradients reduced in the
dtype optsel's engines are configured with — fp32 (the bundled ``deepspeed/zero3.json`` sets
``communication_data_type: fp32``; the FSDP2 engine's ``MixedPrecisionPolicy`` has ``reduce_dtype`` =
``fsdp2_engine.GRAD_REDUCE_DTYPE``, fp32, torchtitan's default too; both read from the code) — and, for a
user who switches that to bf16, a second set of columns. ZeRO-3 gathers every parameter in forward and
again in backward and reduce-scatters the gradients ((2 + 2 + g) · P B, g = the gradient wire bytes);
FSDP2 (``fully_shard`` per decoder layer + root) the same, except that the root (embeddings, final norm,
lm_head) is not resharded after forward, so backward re-gathers only the decoder layers
((2 + g) · P + 2 · (P − P_root) B); one micro-batch per step (gradient accumulation would repeat the
engines' gathers and reduce-scatters per micro-batch and not the selector's, so this is the engines'
lowest traffic). FTW: compute dtype fp32 (4 B), pool N global, m = N/2 survivors (filter_ratio 0.5),
|V| = 32 target samples refreshed every step, 32 × 32 sketches, T tokens per sample; a tied lm_head is
not covered (capture.py). Two-stage FTW (``prefilter: head``, exchange direction): stage 1's bytes
(``head_stage_cost``: the target batch, the head's M and P gathered whole, 2N scores; a tied head's state is
the embedding's, scored all the same) plus the direction exchange's on the m = N/2 survivors.

Step FLOPs (``step_flops``, docs/design.md#two-stage's formulas, in plain training steps on k) at T = 2048 for
N/k = 2, 4, 8 and |V| = k target rows, with each shape's head share h (``head_share``): what a step costs at
scale, where the head is a small part of a forward (h ≈ 0.06 at 8B against ≈ 0.2–0.5 for the CPU sizes the
overhead benchmark counts).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optsel.selection.cost_model import (
    HeadStageShape,
    StepShape,
    choose_backend,
    head_share,
    head_stage_cost,
    layer_cost,
    step_flops,
)
from optsel.selection.ftw_config import FTWConfig

NUM_TARGET, K_SKETCH, ESZ, BF16 = 32, 32, 4, 2
TS, NS, RS = (2048, 8192), (64, 256), (8, 16, 32, 64)


@dataclass(frozen=True)
class Llama:
    name: str
    hidden: int
    intermediate: int
    layers: int
    kv_dim: int
    vocab: int
    tied: bool

    def linears(self) -> list[tuple[int, int]]:
        """(d_in, d_out) of every covered linear layer."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        block = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
        return block * self.layers + ([] if self.tied else [(h, self.vocab)])

    @property
    def root_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    @property
    def params(self) -> int:
        per_layer = sum(a * b for a, b in self.linears()[:7]) + 2 * self.hidden
        return per_layer * self.layers + self.root_params


MODELS = (
    Llama("Llama 1B", 2048, 8192, 16, 512, 128256, tied=True),
    Llama("Llama 8B", 4096, 14336, 32, 1024, 128256, tied=False),
    Llama("Llama 70B", 8192, 28672, 80, 1024, 128256, tied=False),
)


def shipped_grad_wire_bytes() -> dict[str, int]:
    """Bytes per gradient element that each engine, as optsel configures it, reduce-scatters."""
    from optsel.pipeline.engines.deepspeed_engine import load_ds_config
    from optsel.pipeline.engines.fsdp2_engine import GRAD_REDUCE_DTYPE
    from optsel.resources import default_deepspeed_config

    comm = str(load_ds_config(default_deepspeed_config()).get("communication_data_type", "bf16")).lower()
    ds = {"fp32": 4, "float32": 4, "fp16": 2, "float16": 2, "bf16": 2, "bfloat16": 2}[comm]
    return {"zero3": ds, "fsdp2": GRAD_REDUCE_DTYPE.itemsize}


def engine_bytes(model: Llama, grad_wire: dict[str, int]) -> dict[str, float]:
    """Payload per rank and step: bf16 gathers in forward and backward, gradients at ``grad_wire`` B each."""
    P, root = model.params, model.root_params
    return {"zero3": (2 * BF16 + grad_wire["zero3"]) * P, "fsdp2": (BF16 + grad_wire["fsdp2"]) * P + BF16 * (P - root)}


def two_stage_bytes(model: Llama, T: int, N: int, R: int) -> dict:
    """``prefilter: head`` then exact stage 2 on the m = N/2 survivors (exchange direction), per rank and step."""
    m = N // 2
    stage1 = head_stage_cost(
        HeadStageShape(
            n=N,
            window=T,
            hidden=model.hidden,
            vocab=model.vocab,
            target_rows=NUM_TARGET,
            target_len=T,
            scored_target_rows=NUM_TARGET,
            forward_flops_per_token=0.0,
            survivors=m,
            world=R,
            esz=ESZ,
        )
    )
    stage2 = selector_bytes(model, "direction", T, m, R, pool_survivors=m)
    return {"bytes": stage1.bytes + stage2["bytes"], "stage1": stage1.bytes, "backends": stage2["backends"]}


def selector_bytes(
    model: Llama, exchange: str, T: int, N: int, R: int, wire_esz: int = ESZ, pool_survivors: int | None = None
) -> dict:
    """Selector payload per rank and step for one exchange, with auto's per-layer backends (m = N/2 survivors;
    ``pool_survivors``: m, for a pool that is already the survivors)."""
    m, k = (N // 2 if pool_survivors is None else pool_survivors), max(1, N // 4)
    total, backends = 0.0, {}
    for d_in, d_out in model.linears():
        kw = dict(
            T=T, d_in=d_in, d_out=d_out, n=N, m=m, world=R, k_out=K_SKETCH, k_in=K_SKETCH, esz=ESZ, wire_esz=wire_esz
        )
        backend = choose_backend(exchange, max_temp_elems=1 << 24, **kw)
        backends[backend] = backends.get(backend, 0) + 1
        total += layer_cost(exchange, backend, **kw).bytes
        if exchange == "factors":  # the target's factors, all-gathered
            total += NUM_TARGET * T * (d_in + d_out) * ESZ
    if exchange == "direction":  # target token ids (input_ids, attention_mask, labels; int64) + N × (b, diag, tokens)
        total += NUM_TARGET * T * 3 * 8 + N * 3 * 8
    else:  # b and diag K partials all-reduced (factors) / gathered sizes; Gram m × m (factors, exact)
        total += 2 * N * 8 + m * m * 8
    total += 2 * k * 8 + R * 8  # rank 0's choice broadcast, the pool sizes
    return {"bytes": total, "backends": backends}


def table(models=MODELS) -> list[dict]:
    shipped = shipped_grad_wire_bytes()
    rows = []
    for model in models:
        eng = engine_bytes(model, shipped)
        eng_bf16 = {f"{k}_bf16_grad": v for k, v in engine_bytes(model, {"zero3": BF16, "fsdp2": BF16}).items()}
        for T in TS:
            for N in NS:
                for R in RS:
                    row = {
                        "model": model.name,
                        "params": model.params,
                        "T": T,
                        "N": N,
                        "R": R,
                        **eng,
                        **eng_bf16,
                        "grad_wire_bytes": shipped,
                    }
                    for label, exchange, wire in (
                        ("factors", "factors", ESZ),
                        ("sketches", "sketches", ESZ),
                        ("direction", "direction", ESZ),
                        ("direction_bf16", "direction", BF16),
                    ):
                        sel = selector_bytes(model, exchange, T, N, R, wire)
                        row[label] = sel["bytes"]
                        row[label + "_backends"] = sel["backends"]
                    two = two_stage_bytes(model, T, N, R)
                    row["two_stage"], row["two_stage_stage1"] = two["bytes"], two["stage1"]
                    rows.append(row)
    return rows


def _b(x: float) -> str:
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"


def _r(x: float) -> str:
    return f"{x:.3g}×" if x >= 0.01 else f"{100 * x:.2g} %"


def markdown(rows: list[dict]) -> str:
    """One row per (model, T, N); ranks whose row reads the same are merged (payload ratios do not depend on R)."""
    L = [
        "| model | T | N | R | ZeRO-3 | FSDP2 | factors | sketches | direction (default, exact b) | "
        "direction, bf16 M | two-stage (head → exact on N/2) | factors / ZeRO-3 | sketches / ZeRO-3 | "
        "direction / ZeRO-3 | direction / FSDP2 | direction / ZeRO-3, bf16 grads | direction / FSDP2, bf16 grads | "
        "direction bf16 M / ZeRO-3 | two-stage / ZeRO-3 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[tuple[int, str]]] = {}
    for r in rows:
        z, f = r["zero3"], r["fsdp2"]
        cells = (
            f"{_b(z)} | {_b(f)} | {_b(r['factors'])} | {_b(r['sketches'])} | {_b(r['direction'])} | "
            f"{_b(r['direction_bf16'])} | {_b(r['two_stage'])} | {_r(r['factors'] / z)} | {_r(r['sketches'] / z)} | "
            f"{_r(r['direction'] / z)} | {_r(r['direction'] / f)} | {_r(r['direction'] / r['zero3_bf16_grad'])} | "
            f"{_r(r['direction'] / r['fsdp2_bf16_grad'])} | {_r(r['direction_bf16'] / z)} | "
            f"{_r(r['two_stage'] / z)}"
        )
        groups.setdefault((r["model"], r["T"], r["N"]), []).append((r["R"], cells))
    for (model, T, N), items in groups.items():
        by_cells: dict[str, list[int]] = {}
        for R, cells in items:
            by_cells.setdefault(cells, []).append(R)
        for cells, ranks in by_cells.items():
            span = f"{ranks[0]}–{ranks[-1]}" if len(ranks) > 1 else str(ranks[0])
            L.append(f"| {model} | {T} | {N} | {span} | {cells} |")
    return "\n".join(L)


#: (label, FTW options given k and T) for the FLOPs table: the default and the overhead benchmark's variants
FLOP_VARIANTS = [
    ("one stage (default)", lambda k, T: {}),
    ("head → exact stage 2 on 2k", lambda k, T: {"prefilter": "head", "filter_size": 2 * k}),
    (
        "head → exact on k, W = T/4, reused target",
        lambda k, T: {"prefilter": "head", "filter_size": k, "prefilter_window": T // 4, "prefilter_target": "reuse"},
    ),
    ("head → exact on k, exit L = 0", lambda k, T: {"prefilter": "head", "filter_size": k, "prefilter_depth": 0}),
    ("head only", lambda k, T: {"prefilter": "head", "prefilter_stage2": "head"}),
    ("head only, W = T/8", lambda k, T: {"prefilter": "head", "prefilter_stage2": "head", "prefilter_window": T // 8}),
    ("head only, exit L = 0", lambda k, T: {"prefilter": "head", "prefilter_stage2": "head", "prefilter_depth": 0}),
    ("learned → exact stage 2 on 2k", lambda k, T: {"prefilter": "learned", "filter_size": 2 * k}),
    ("learned → exact stage 2 on k", lambda k, T: {"prefilter": "learned", "filter_size": k}),
]
FLOP_T, FLOP_K, FLOP_RATIOS = 2048, 16, (2, 4, 8)


def step_ratio(options: dict, k: int, n: int, num_target: int, T: int, layers: int, h: float) -> float:
    """``step_flops`` of an FTW step with ``options`` at budget k, pool n, |V| = num_target rows of T tokens."""
    return step_flops(StepShape.of(FTWConfig(budget=k, **options), n, num_target, T, layers, h))


def flops_table(models=MODELS) -> list[dict]:
    """Each variant's step FLOPs / a plain step on k (``step_flops``) per model and N/k."""
    rows = []
    for model in models:
        h = head_share(model.hidden, model.layers, model.intermediate, model.kv_dim, model.vocab, FLOP_T)
        for label, options in FLOP_VARIANTS:
            row: dict = {"model": model.name, "variant": label, "head_share": h}
            for ratio in FLOP_RATIOS:
                opts = options(FLOP_K, FLOP_T)
                row[f"r{ratio}"] = step_ratio(opts, FLOP_K, ratio * FLOP_K, FLOP_K, FLOP_T, model.layers, h)
            rows.append(row)
    return rows


def flops_markdown(rows: list[dict]) -> str:
    L = [
        "| model (h) | variant | " + " | ".join(f"N/k = {r}" for r in FLOP_RATIOS) + " |",
        "|---|---|" + "---|" * len(FLOP_RATIOS),
    ]
    for r in rows:
        L.append(
            f"| {r['model']} ({r['head_share']:.3f}) | {r['variant']} | "
            + " | ".join(f"{r[f'r{x}']:.2f}×" for x in FLOP_RATIOS)
            + " |"
        )
    return "\n".join(L)


REAL_GRID_FILE = Path(__file__).resolve().parent / "quality_grid.yaml"
REAL_TS = (256, 512)  #: padded pool widths bracketing the real-text stream's (max_seq_len 512)


def real_text_flops(grid_file: Path = REAL_GRID_FILE) -> list[dict]:
    """``step_flops`` at the real-text grid's step (its ``real`` section: N, k, |V| and the FTW variants, on the
    base of ``real.base``), at the padded widths ``REAL_TS``: what one step of each FTW run there costs in
    plain steps on k. |V| = 32 = 8k target rows there, so the target's capture is half the one-stage step."""
    from benchmarks.quality_real import load_real_grid  # noqa: PLC0415 - reads the grid file, yaml

    grid = load_real_grid(grid_file)
    base, n, num_target = grid.base, grid.settings.pool, grid.settings.num_target
    k = grid.cells[0].budget
    labels: list[tuple[str, tuple[str, dict]]] = [("ftw", ("ftw", {}))] + [
        (lab, spec) for lab, spec in grid.variants.items() if spec[0] == "ftw"
    ]
    rows = []
    for label, (_, options) in labels:
        row: dict = {"variant": label, "options": options, "N": n, "k": k, "num_target": num_target}
        for T in REAL_TS:
            h = head_share(base.hidden, base.layers, base.intermediate, base.hidden, base.vocab_size, T)
            row[f"T{T}"] = step_ratio(options, k, n, num_target, T, base.layers, h)
        rows.append(row)
    return rows


def real_text_markdown(rows: list[dict]) -> str:
    L = [
        "| real-text variant | options | " + " | ".join(f"T = {T}" for T in REAL_TS) + " |",
        "|---|---|" + "---|" * len(REAL_TS),
    ]
    for r in rows:
        opts = ", ".join(f"{k}: {v}" for k, v in r["options"].items()) or "(default: one stage)"
        L.append(f"| {r['variant']} | {opts} | " + " | ".join(f"{r[f'T{T}']:.2f}×" for T in REAL_TS) + " |")
    return "\n".join(L)


def _span(sel: list[dict], key: str, engines: tuple[str, str]) -> tuple[float, float]:
    ratios = [r[key] / r[e] for r in sel for e in engines]
    return min(ratios), max(ratios)


def verdict(rows: list[dict], model: str = "Llama 8B") -> list[str]:
    """The issue's bars for the 8B shape (direction ≤ 0.5×, sketches ≤ 1 % of the engine's traffic)."""
    sel = [r for r in rows if r["model"] == model]
    g = sel[0]["grad_wire_bytes"]
    shipped = ("zero3", "fsdp2")
    bf16 = ("zero3_bf16_grad", "fsdp2_bf16_grad")
    engines_text = {
        shipped: f"ZeRO-3 and FSDP2 as optsel configures them (gradients reduced in "
        f"{'fp32' if g['zero3'] == 4 else 'bf16'} / {'fp32' if g['fsdp2'] == 4 else 'bf16'})",
        bf16: "ZeRO-3 and FSDP2 with gradients reduced in bf16",
    }
    out = []
    for key, label, engines, bar, bar_text in (
        ("direction", "direction (default, exact b, fp32 M)", shipped, 0.5, "0.5×"),
        ("direction", "direction (default, exact b, fp32 M)", bf16, 0.5, "0.5×"),
        ("direction_bf16", "direction with direction_dtype: bfloat16", bf16, 0.5, "0.5×"),
        ("sketches", "sketches", bf16, 0.01, "1 %"),
        ("factors", "factors", shipped, 0.5, "0.5×"),
    ):
        best, worst = _span(sel, key, engines)
        out.append(
            f"- {model}, {label}: {_r(best)}–{_r(worst)} of the traffic of {engines_text[engines]}, every T, "
            f"N, R above; bar ≤ {bar_text}: {'met' if worst <= bar else 'NOT met'}."
        )
    covered = next(m for m in MODELS if m.name == model)
    share = sum(d_in * d_out for d_in, d_out in covered.linears()) / covered.params
    fp32_span, bf16_span = _span(sel, "direction", shipped), _span(sel, "direction", bf16)
    out.append(
        f"- Why the margin is thin and depends on the gradient dtype: b needs the whole M on the candidate's "
        f"rank, one fp32 value per covered parameter (4 B), while the engine moves two bf16 gathers and one "
        f"gradient reduce-scatter per parameter (2 + 2 + 4 = 8 B with fp32 gradients, 6 B with bf16). With "
        f"{100 * share:.0f} % of the {model}'s parameters covered that is {_r(fp32_span[0])}–{_r(fp32_span[1])} "
        f"with fp32 gradients and {_r(bf16_span[0])}–{_r(bf16_span[1])} with bf16 ones. A narrower M (bf16: b "
        f"rounded, ≈ 2⁻⁹ relative per element) or gradient accumulation (the engine's traffic repeats per "
        f"micro-batch, the selector's does not) goes lower."
    )
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="results/cost_model")
    args = parser.parse_args(argv)
    rows = table()
    flop_rows = flops_table()
    real_rows = real_text_flops()
    doc = __doc__.split("\n\n")
    md = [
        "# Selector bytes per step vs the engines' own (cost model)",
        "",
        "Command: `python -m benchmarks.cost_model`. Per rank, per optimizer step, payload bytes. " + doc[2].strip(),
        "",
        doc[3].strip(),
        "",
        "Parameters: "
        + ", ".join(f"{m.name} {m.params / 1e9:.2f} B" for m in MODELS)
        + ". Backends auto picked (per layer): "
        + "; ".join(sorted({f"{r['model']} direction → {r['direction_backends']}" for r in rows if r["R"] == 8})),
        "",
        markdown(rows),
        "",
        *verdict(rows),
        "",
        "## Step FLOPs against a plain training step on k (analytic)",
        "",
        doc[4].strip(),
        "",
        flops_markdown(flop_rows),
        "",
        f"At the real-text grid's step (`real` section of benchmarks/quality_grid.yaml: N = {real_rows[0]['N']}, "
        f"k = {real_rows[0]['k']}, |V| = {real_rows[0]['num_target']} target rows, its base model), padded "
        "pool width T:",
        "",
        real_text_markdown(real_rows),
        "",
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cost_model.md").write_text("\n".join(md))
    (out / "cost_model.json").write_text(
        json.dumps({"bytes": rows, "flops": flop_rows, "real_text_flops": real_rows}, indent=1)
    )
    print("\n".join(md))
    return rows


if __name__ == "__main__":
    main()
