"""Speed benchmark: wall time per step, by phase, of random / full / greats / uds / ftw (each Gram
backend), as ratios to a plain training step over the whole pool; the same ratio in counted FLOPs; peak
memory; FTW's FLOP ratio over a grid of pool size N, budget k and target size |V|; FTW select time vs
sequence length T per Gram backend.

    python -m benchmarks.speed [--quick] [--out results/speed] [--device cpu|cuda]
    python -m benchmarks.speed --lora-only [--repeats 5] [--out results/speed_lora]   # the LoRA rows
    python -m benchmarks.speed --muon-only [--repeats 3] [--out results/speed_muon]   # the Muon rows

The model is the demo's tiny Llama (hidden 64, 2 layers, byte vocabulary 259), trained with
torch AdamW a few steps first so the optimizer state exists; pools are random token sequences with
random lengths (right padding, first 4 tokens prompt). One step of a method = select + forward/
backward on the chosen samples with their weights + optimizer step; the reference ("plain") step is
forward/backward + optimizer step on all N. Timing runs in interleaved rounds: each round times the
plain step, then every method once (the order rotated by one each round), then the plain step again;
a method's ratio is the median over rounds of its step / the mean of that round's two plain steps, so a
shared machine's slow spells hit the method and its reference alike. FLOPs: matmul and attention
FLOPs (torch.utils.flop_counter, with the CPU flash-attention kernels added) of one step per method
after the timed rounds — deterministic, and what a compute-bound accelerator's ratio tends to. On CUDA
every timed region is synchronized. Each configuration is warmed up first (a whole warm-up round).
Peak memory: CUDA max_memory_allocated per configuration; on CPU the process's peak RSS (ru_maxrss,
monotone over the run, so only an upper bound).
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from optsel.losses import per_sample_token_mean_ce
from optsel.pipeline.files import jsonio
from optsel.selection.base import get_selector_factory

VOCAB = 259


SIZES = {  # name: (hidden, layers, intermediate); "small" is the demo's model, the others compute-bound
    "small": (64, 2, 128),
    "cpu-compute": (256, 4, 512),
    "gpu-100m": (1024, 8, 2816),
}


def build_model(device: torch.device, max_pos: int, seed: int = 0, size: str = "small"):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, inter = SIZES[size]
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=max(4, hidden // 64),
        num_key_value_heads=max(2, hidden // 128),
        max_position_embeddings=max_pos,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).to(device)


def make_pool(n: int, T: int, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(4, T // 2), T + 1, (n,), generator=gen)
    lengths[0] = T
    ids = torch.randint(3, VOCAB, (n, T), generator=gen)
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    labels = (ids * mask).masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    return {k: v.to(device) for k, v in {"input_ids": ids * mask, "attention_mask": mask, "labels": labels}.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_step(model, opt, batch, weights) -> None:
    opt.zero_grad(set_to_none=True)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = (per_sample_token_mean_ce(logits, batch["labels"]).loss * weights.to(logits.dtype)).sum()
    loss.backward()
    opt.step()


def peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def make_selector(method: str, model, opt, k: int, options: dict | None):
    factory = get_selector_factory(method)
    config = None
    if method == "ftw":
        config = factory.config_class(budget=k, **(options or {}))
    return factory(model=model, optimizer=opt, budget=k, seed=0, config=config)


# (label, method, FTW options): ftw's default is the single pass with the active-set solver
CONFIGS = [
    ("random", "random", None),
    ("full", "full", None),
    ("greats", "greats", None),
    ("uds", "uds", None),
    ("ftw[exact]", "ftw", {"gram": "exact"}),
    ("ftw[exact, two-pass]", "ftw", {"gram": "exact", "single_pass": False}),
    ("ftw[exact, refresh 8]", "ftw", {"gram": "exact", "target_refresh": 8}),
    ("ftw[exact, two-pass, fista]", "ftw", {"gram": "exact", "single_pass": False, "solver": "torch"}),
    ("ftw[ghost]", "ftw", {"gram": "ghost"}),
    ("ftw[sketch]", "ftw", {"gram": "sketch"}),
    ("ftw[auto]", "ftw", {"gram": "auto"}),
    # added 2026-11-27 before its first run: b from sketches too (no exact-b GEMM)
    ("ftw[sketches exchange]", "ftw", {"exchange": "sketches", "gram": "sketch"}),
]


class Method:
    """One configuration under test: its selector and what its timed steps measured."""

    def __init__(self, name: str, method: str, options: dict | None, model, opt, k: int):
        self.name, self.model, self.opt = name, model, opt
        self.selector = make_selector(method, model, opt, k, options)
        self.steps: list[float] = []
        self.selects: list[float] = []
        self.trains: list[float] = []
        self.ratios: list[float] = []
        self.phases: dict[str, float] = {}
        self.peak = 0.0
        self.flops = 0

    def step(self, pool, target, device, record: bool = True) -> float:
        """One select + training step; returns its seconds (recorded unless ``record`` is False)."""
        model, opt = self.model, self.opt
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(device)
        t0 = time.perf_counter()
        sel = self.selector.select(pool, target if self.selector.needs_target else None)
        sync(device)
        t1 = time.perf_counter()
        rows = sel.local_indices.to(device)
        if sel.pool_pass is not None:  # the single pass: the gradient from the capture, no second forward
            opt.zero_grad(set_to_none=True)
            sel.pool_pass.accumulate_into_grads(rows, sel.local_weights.to(device))
            opt.step()
        else:
            train_step(model, opt, {key: v[rows] for key, v in pool.items()}, sel.local_weights.to(device))
        sync(device)
        t2 = time.perf_counter()
        self.peak = max(self.peak, peak_memory(device))
        if record:
            self.steps.append(t2 - t0)
            self.selects.append(t1 - t0)
            self.trains.append(t2 - t1)
            for phase, sec in sel.timings.items():
                self.phases[phase] = self.phases.get(phase, 0.0) + sec
        return t2 - t0

    def row(self) -> dict:
        """Medians over the rounds (phases: means)."""
        n = max(len(self.steps), 1)
        return {
            "select_s": statistics.median(self.selects),
            "train_s": statistics.median(self.trains),
            "step_s": statistics.median(self.steps),
            "ratio_to_plain": statistics.median(self.ratios),
            "ratios": self.ratios,
            "phases_s": {p: s / n for p, s in self.phases.items()},
            "flops": self.flops,
            "peak_memory_bytes": self.peak,
        }


def _attention_flops() -> dict:
    """FLOP formulas for the CPU flash-attention kernels, which torch.utils.flop_counter leaves out."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    def forward(q, k, v, *args, out_val=None, **kwargs):
        return sdpa_flop_count(q.shape, k.shape, v.shape)

    def backward(grad, q, k, v, *args, out_val=None, **kwargs):
        return sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)

    forward._get_raw = backward._get_raw = True  # they take tensors, not shapes
    aten = torch.ops.aten
    pairs = (
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), forward),
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None), backward),
    )
    return {op: fn for op, fn in pairs if op is not None}


def count_flops(fn) -> int:
    """Matmul + attention FLOPs of ``fn()`` (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=_attention_flops()) as counter:
        fn()
    return int(counter.get_total_flops())


def plain_step(model, opt, pool, device) -> float:
    """Seconds of one plain step (forward + backward + AdamW over the whole pool)."""
    n = pool["input_ids"].shape[0]
    sync(device)
    t0 = time.perf_counter()
    train_step(model, opt, pool, torch.full((n,), 1.0 / n, device=device))
    sync(device)
    return time.perf_counter() - t0


def floor_ratio(n: int, k: int, v: int) -> float:
    """FTW's single-pass step / a plain step in covered-layer GEMM FLOPs, target every step. With F one
    forward over the pool's linear layers: plain = F + F (input gradients) + F (weight gradients); FTW =
    (1 + v/n)·2F (forward + input gradients of pool and target) + F (exact b: the pool's weight-gradient
    GEMM against M instead) + (v/n)·F (the target's weight gradient) + (k/n)·F (the chosen rows')."""
    return (3 + 3 * v / n + k / n) / 3


def interleaved_rounds(
    methods: list[Method], pools: list, target, device, reference, tag: str, ref_name: str
) -> list[float]:
    """The timing rounds (module docstring): per pool, ``reference(pool)``, every method's step once in an
    order rotated by one per round, ``reference(pool)`` again; round 0 warms up. Appends to each method's
    ``ratios`` its step / that round's mean reference; returns the reference seconds of the timed rounds."""
    seconds: list[float] = []
    for r, pool in enumerate(pools):
        before = reference(pool)
        shift = r % len(methods)
        ran = {m.name: m.step(pool, target, device, record=r > 0) for m in methods[shift:] + methods[:shift]}
        after = reference(pool)
        if r == 0:
            continue
        mean = (before + after) / 2
        seconds += [before, after]
        for m in methods:
            m.ratios.append(ran[m.name] / mean)
        print(
            f"{tag} round {r}: {ref_name} {mean * 1e3:.1f} ms, "
            + ", ".join(f"{m.name} x{m.ratios[-1]:.2f}" for m in methods),
            flush=True,
        )
    return seconds


def step_table(device, n, T, k, repeats, size: str = "small") -> dict:
    """Per method (and "plain"): median step, select and train seconds over ``repeats`` interleaved rounds,
    the median per-round ratio to the plain step, mean phase seconds, FLOPs of one step and their ratio."""
    model = build_model(device, max_pos=max(64, T), size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    warm = [make_pool(n, T, 1000 + s, device) for s in range(3)]
    for p in warm:
        train_step(model, opt, p, torch.full((n,), 1.0 / n, device=device))
    pools = [make_pool(n, T, s, device) for s in range(repeats + 1)]
    target = make_pool(max(4, k), T, 999, device)
    methods = [
        Method(name, method, options, model, opt, k if method != "full" else n) for name, method, options in CONFIGS
    ]
    plain_peak = 0.0
    calls = 0

    def reference(pool) -> float:  # the peak memory of the first plain step of each round
        nonlocal plain_peak, calls
        first, calls = calls % 2 == 0, calls + 1
        if first and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        seconds = plain_step(model, opt, pool, device)
        if first:
            plain_peak = max(plain_peak, peak_memory(device))
        return seconds

    plain_s = interleaved_rounds(methods, pools, target, device, reference, f"[speed] {size}", "plain")
    plain_flops = count_flops(lambda: train_step(model, opt, pools[0], torch.full((n,), 1.0 / n, device=device)))
    rows = {
        "plain": {
            "step_s": statistics.median(plain_s),
            "ratio_to_plain": 1.0,
            "flops": plain_flops,
            "flop_ratio": 1.0,
            "peak_memory_bytes": plain_peak,
        }
    }
    for m in methods:
        m.flops = count_flops(lambda: m.step(pools[0], target, device, record=False))
        rows[m.name] = m.row()
        rows[m.name]["flop_ratio"] = m.flops / plain_flops
        print(
            f"[speed] {m.name:28s} step {rows[m.name]['step_s'] * 1e3:8.1f} ms  "
            f"x{rows[m.name]['ratio_to_plain']:.2f} of plain, x{rows[m.name]['flop_ratio']:.3f} in FLOPs",
            flush=True,
        )
    return rows


def rows_against_reference(
    methods: list[Method], pools, target, device, tag: str, what: str, width: int
) -> tuple[dict[str, dict], list[Method]]:
    """Time ``methods[1:]`` in interleaved rounds against ``methods[0]`` (the reference: the plain step on the
    k rows, i.e. random with the same model and optimizer) and count each one's FLOPs; rows keyed by name
    with ``ratio_to_plain`` (time) and ``flop_ratio`` against the reference. Returns (rows, the methods)."""
    ref, *rest = methods
    plain_s = interleaved_rounds(
        rest,
        pools,
        target,
        device,
        lambda pool: ref.step(pool, target, device),
        f"[speed] {tag}",
        f"{what.lower()} random",
    )
    ref.flops = count_flops(lambda: ref.step(pools[0], target, device, record=False))
    rows = {
        ref.name: {
            "step_s": statistics.median(plain_s),
            "select_s": statistics.median(ref.selects),
            "train_s": statistics.median(ref.trains),
            "ratio_to_plain": 1.0,
            "flops": ref.flops,
            "flop_ratio": 1.0,
            "phases_s": {p: t / len(ref.steps) for p, t in ref.phases.items()},
            "peak_memory_bytes": ref.peak,
        }
    }
    for m in rest:
        m.flops = count_flops(lambda: m.step(pools[0], target, device, record=False))
        rows[m.name] = {**m.row(), "flop_ratio": m.flops / ref.flops}
        print(
            f"[speed] {m.name:{width}s} step {rows[m.name]['step_s'] * 1e3:8.1f} ms  "
            f"x{rows[m.name]['ratio_to_plain']:.2f} of the {what} random step, x{rows[m.name]['flop_ratio']:.3f} "
            f"in FLOPs",
            flush=True,
        )
    return rows, rest


#: LoRA rows (written 2026-12-02 before their first run): peft adapters r = 8, alpha 16 on the
#: attention projections (optsel's LoraSettings defaults); the reference is the plain LoRA step on the k rows
#: (the random selector's step), and the full fine-tuning rows of the same model size are timed beside them
LORA_CONFIGS = [
    ("lora random (the reference)", "random", None, True),
    ("lora ftw[auto]", "ftw", {"gram": "auto"}, True),
    ("lora ftw[exact]", "ftw", {"gram": "exact"}, True),
    ("full-FT random", "random", None, False),
    ("full-FT ftw[auto]", "ftw", {"gram": "auto"}, False),
]
LORA = {"r": 8, "alpha": 16.0, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def build_lora_model(device: torch.device, max_pos: int, seed: int = 0, size: str = "small"):
    """:func:`build_model` with peft LoRA adapters (:data:`LORA`); only the adapters require grad."""
    from peft import LoraConfig, get_peft_model

    model = build_model(device, max_pos, seed, size)
    torch.manual_seed(seed + 1)
    return get_peft_model(
        model,
        LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules=list(LORA["target_modules"]),
            task_type="CAUSAL_LM",
        ),
    )


def lora_table(device, n, T, k, repeats, size: str = "small") -> dict:
    """The LoRA rows (:data:`LORA_CONFIGS`): median step seconds over ``repeats`` interleaved rounds and the
    median per-round ratio to the plain LoRA step on k (the first row, timed as the round's reference),
    FLOPs of one step and their ratio to that reference's."""
    warm = [make_pool(n, T, 1000 + s, device) for s in range(3)]
    models = {}
    for lora in (True, False):
        model = (build_lora_model if lora else build_model)(device, max_pos=max(64, T), size=size)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        for p in warm:
            train_step(model, opt, p, torch.full((n,), 1.0 / n, device=device))
        models[lora] = (model, opt)
    pools = [make_pool(n, T, s, device) for s in range(repeats + 1)]
    target = make_pool(max(4, k), T, 999, device)
    methods = [Method(name, method, options, *models[lora], k) for name, method, options, lora in LORA_CONFIGS]
    return rows_against_reference(methods, pools, target, device, f"{size} lora", "LoRA", width=28)[0]


#: Muon rows (written 2026-12-02 15:15 UTC before their first run): optimizer.name muon (Muon + AdamW,
#: the usual hybrid split, pipeline/engines/muon.py; the project's Muon defaults) on the step table's model; the
#: reference is the plain Muon step on the k rows (the random selector's step); FTW with geometry auto (the exact
#: NS Jacobian on the Muon matrices) and the Muon grid's control models; the AdamW rows of the same model beside
MUON_CONFIGS = [
    ("muon random (the reference)", "random", None, "muon"),
    ("muon ftw[auto] (NS Jacobian)", "ftw", {"geometry": "auto"}, "muon"),
    ("muon ftw[lowrank S]", "ftw", {"geometry": "auto", "muon_model": "lowrank"}, "muon"),
    ("muon ftw[adam model]", "ftw", {"geometry": "auto", "muon_model": "adam"}, "muon"),
    ("muon ftw[identity]", "ftw", {"geometry": "auto", "muon_model": "identity"}, "muon"),
    ("adamw random", "random", None, "adamw"),
    ("adamw ftw[auto]", "ftw", {"gram": "auto"}, "adamw"),
]
MUON = {"lr": 1e-3, "muon_lr": 0.02, "muon_momentum": 0.95, "muon_nesterov": True, "muon_adjust_lr_fn": "original"}


def muon_optimizer(model, name: str):
    """Muon + AdamW (``name`` muon, :data:`MUON`) or AdamW, from the engines' own builder."""
    from optsel.pipeline.engines.muon import build_optimizer
    from optsel.pipeline.engines.shared import OptimizerConfig

    return build_optimizer(
        model, [p for p in model.parameters() if p.requires_grad], OptimizerConfig(name=name, **MUON)
    )


def ns_jvp_flops(model, n: int, m: int, ns_steps: int = 5) -> int:
    """FTW's Newton–Schulz Jacobian FLOPs per step (selection/muon_geometry.py): ns_steps·(6p²q + 4p³) per
    Muon matrix p×q (p ≤ q) for each of the n candidates (diag K) and the m survivors (K)."""
    from optsel.pipeline.engines.muon import split_muon_params

    muon, _ = split_muon_params(model)
    per = sum(ns_steps * (6 * min(p.shape) ** 2 * max(p.shape) + 4 * min(p.shape) ** 3) for p in muon)
    return (n + m) * per


def muon_table(device, n, T, k, repeats, size: str = "small") -> dict:
    """The Muon rows (:data:`MUON_CONFIGS`): median step seconds over ``repeats`` interleaved rounds, the median
    per-round ratio to the plain Muon step on k (the first row), FLOPs of one step and their ratio, and FTW's
    NS-Jacobian FLOPs by formula (:func:`ns_jvp_flops`) beside the counted ones."""
    warm = [make_pool(n, T, 1000 + s, device) for s in range(3)]
    models = {}
    for name in ("muon", "adamw"):
        model = build_model(device, max_pos=max(64, T), size=size)
        opt = muon_optimizer(model, name)
        for p in warm:
            train_step(model, opt, p, torch.full((n,), 1.0 / n, device=device))
        models[name] = (model, opt)
    pools = [make_pool(n, T, s, device) for s in range(repeats + 1)]
    target = make_pool(max(4, k), T, 999, device)
    methods = [Method(label, method, options, *models[name], k) for label, method, options, name in MUON_CONFIGS]
    rows, measured = rows_against_reference(methods, pools, target, device, f"{size} muon", "Muon", width=30)
    m_survivors = max(k, int(0.5 * n))  # FTWConfig's default filter_ratio 0.5
    for m in measured:
        if m.name == "muon ftw[auto] (NS Jacobian)":
            jvp = ns_jvp_flops(models["muon"][0], n, m_survivors)
            rows[m.name].update(ns_jvp_flops=jvp, ns_jvp_share=jvp / m.flops)
    return rows


#: (N, k, |V|) points of the FLOP-ratio grid: the step table's own point, then the target and the budget
#: smaller against the pool; FTW's default and the sketches exchange (fixed 2026-11-27 before any run)
FLOP_GRID = [(64, 16, 16), (64, 16, 4), (256, 16, 16), (256, 32, 8), (1024, 32, 16)]
GRID_VARIANTS = {"default": None, "sketches exchange": {"exchange": "sketches", "gram": "sketch"}}


def flop_grid(device, T: int, size: str, points: list[tuple[int, int, int]]) -> list[dict]:
    """FTW's step (each of GRID_VARIANTS: single pass, target every step) / a plain step over the pool,
    in counted FLOPs, at each (N, k, |V|), beside :func:`floor_ratio`."""
    out = []
    for n, k, v in points:
        model = build_model(device, max_pos=max(64, T), size=size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        pool, target = make_pool(n, T, 21, device), make_pool(v, T, 22, device)
        train_step(model, opt, pool, torch.full((n,), 1.0 / n, device=device))
        plain = count_flops(lambda: train_step(model, opt, pool, torch.full((n,), 1.0 / n, device=device)))
        row = {"N": n, "k": k, "V": v, "floor": floor_ratio(n, k, v)}
        for label, options in GRID_VARIANTS.items():
            ftw = Method("ftw", "ftw", options, model, opt, k)
            ftw.step(pool, target, device, record=False)
            row[label] = count_flops(lambda: ftw.step(pool, target, device, record=False)) / plain
        out.append(row)
        print(
            f"[speed] FLOP grid N={n} k={k} |V|={v}: "
            + ", ".join(f"{label} x{row[label]:.3f}" for label in GRID_VARIANTS)
            + f" (floor x{row['floor']:.3f})",
            flush=True,
        )
    return out


#: select-vs-T variants: (label, gram, capture chunking). Memory is bounded by chunking in both: 4 samples
#: per capture pass (as first committed), or a token budget of 4 × the sweep's longest T — the same bound at
#: the longest T, whole-pool passes at short T (added 2026-11-27; both reported)
def sweep_variants(max_T: int) -> list[tuple[str, str, dict]]:
    tokens = 4 * max_T
    return [
        ("auto", "auto", {"capture_chunk_size": 4}),
        ("exact", "exact", {"capture_chunk_size": 4}),
        (f"auto, ≤ {tokens} tokens/pass", "auto", {"capture_chunk_tokens": tokens}),
        (f"exact, ≤ {tokens} tokens/pass", "exact", {"capture_chunk_tokens": tokens}),
    ]


def seq_sweep(device, n, k, lengths, repeats, cap_s, size: str = "small") -> dict:
    """FTW select seconds and the plain step over the same N at each T (:func:`sweep_variants`: the
    default "auto" and "exact", chunked by samples and by tokens), in interleaved rounds after a warm-up
    one (plain, every variant's select, plain); medians over rounds, the ratio per round against that
    round's mean plain step. A variant is dropped after a T whose select exceeds cap_s."""
    variants = sweep_variants(max(lengths))
    out: dict[str, dict[int, dict[str, float]]] = {label: {} for label, _, _ in variants}
    model = build_model(device, max_pos=max(lengths), size=size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, opt, make_pool(n, 64, 7, device), torch.full((n,), 1.0 / n, device=device))
    factory = get_selector_factory("ftw")
    for T in lengths:
        pool, target = make_pool(n, T, 11, device), make_pool(4, T, 12, device)
        live = {
            label: factory(
                model=model,
                optimizer=opt,
                budget=k,
                seed=0,
                config=factory.config_class(budget=k, gram=gram, **chunking),
            )
            for label, gram, chunking in variants
            if not out[label] or max(r["select_s"] for r in out[label].values()) <= cap_s
        }
        plains: list[float] = []
        selects: dict[str, list[float]] = {label: [] for label in live}
        ratios: dict[str, list[float]] = {label: [] for label in live}
        for r in range(repeats + 1):
            before = plain_step(model, opt, pool, device)
            took = {}
            for label, sel in live.items():
                sync(device)
                t0 = time.perf_counter()
                sel.select(pool, target)
                sync(device)
                took[label] = time.perf_counter() - t0
            after = plain_step(model, opt, pool, device)
            if r == 0:
                continue
            plains += [before, after]
            for label, sec in took.items():
                selects[label].append(sec)
                ratios[label].append(sec / ((before + after) / 2))
        for label in live:
            res = out[label][T] = {
                "select_s": statistics.median(selects[label]),
                "plain_s": statistics.median(plains),
                "ratio": statistics.median(ratios[label]),
            }
            print(
                f"[speed] T={T:5d} {label:28s} select {res['select_s']:.3f} s, plain {res['plain_s']:.3f} s, "
                f"ratio {res['ratio']:.2f}",
                flush=True,
            )
    return out


def solver_table(repeats: int = 50) -> dict:
    """Milliseconds per weight QP (b, K as FTW forms them) for each solver at m = 32 and 256."""
    from optsel.selection.solvers import active_set_qp, cvxpy_qp, torch_qp

    out: dict[str, dict[str, float]] = {}
    for m in (32, 256):
        gen = torch.Generator().manual_seed(m)
        G = torch.randn(m, 200, generator=gen, dtype=torch.float64) * torch.rand(
            m, 1, generator=gen, dtype=torch.float64
        )
        b, K = G @ torch.randn(200, generator=gen, dtype=torch.float64) / 200**0.5, G @ G.T / 200
        for name, fn, reps in (
            ("active_set", active_set_qp, repeats),
            ("torch (FISTA + polish)", torch_qp, 3),
            ("cvxpy (OSQP)", cvxpy_qp, 3),
        ):
            try:
                fn(b, K, 2.0)
            except ImportError:  # cvxpy not installed (e.g. a GPU image): no row
                continue
            for tau in (2.0, 8.0):
                fn(b, K, tau)
                t0 = time.perf_counter()
                for _ in range(reps):
                    fn(b, K, tau)
                out.setdefault(f"{name}", {})[f"m={m}, tau={tau:g}"] = (time.perf_counter() - t0) / reps * 1e3
    return out


def _step_lines(title: str, st: dict, meta: dict) -> list[str]:
    phases = sorted({p for r in st.values() for p in r.get("phases_s", {})})
    lines = [
        f"## {title}",
        "",
        "| method | step | ratio | FLOP ratio | select | train | " + " | ".join(phases) + " | peak mem (MiB) |",
        "|---|---|---|---|---|---|" + "---|" * len(phases) + "---|",
    ]
    for name, r in st.items():
        ph = " | ".join(f"{r.get('phases_s', {}).get(p, 0.0) * 1e3:.1f}" for p in phases)
        lines.append(
            f"| {name} | {r['step_s'] * 1e3:.1f} | {r.get('ratio_to_plain', 1.0):.2f} | "
            f"{r.get('flop_ratio', float('nan')):.3f} | "
            f"{r.get('select_s', 0.0) * 1e3:.1f} | {r.get('train_s', r['step_s']) * 1e3:.1f} | {ph} | "
            f"{r['peak_memory_bytes'] / 2**20:.0f} |"
        )
    return lines + [""]


def _grid_lines(grid: list[dict], meta: dict) -> list[str]:
    labels = [key for key in grid[0] if key not in ("N", "k", "V", "floor")]
    lines = [
        f"## FTW step / plain step in FLOPs against N, k, |V| (model {meta['grid_model']}, T = {meta['grid_T']})",
        "",
        "Single pass, target every step. Floor: the covered GEMMs of the default (exact b) alone, "
        "(3 + 3|V|/N + k/N) / 3 (benchmarks/speed.py `floor_ratio`).",
        "",
        "| N | k | \\|V\\| | " + " | ".join(labels) + " | floor |",
        "|---|---|---|" + "---|" * (len(labels) + 1),
    ]
    lines += [
        f"| {g['N']} | {g['k']} | {g['V']} | "
        + " | ".join(f"{g[lab]:.3f}" for lab in labels)
        + f" | {g['floor']:.3f} |"
        for g in grid
    ]
    return lines + [""]


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(jsonio.dumps(results, indent=2))
    meta = results["meta"]
    lines = [
        f"# Speed benchmark ({meta['mode']}, {meta['device_name']})",
        "",
        f"Command: `{meta.get('command', 'python -m benchmarks.speed')}` — {meta.get('date', '')}; torch "
        f"{meta.get('torch', '')}, {meta.get('threads', '?')} threads.",
        "",
        f"{meta['repeats']} interleaved rounds after a warm-up round (each: plain, every method once in an "
        f"order rotated per round, plain again). Times in ms, medians over rounds (phases: means); ratio = "
        f"median over rounds of step / that round's mean plain step (forward + backward + AdamW over all N); "
        f"FLOP ratio = counted matmul + attention FLOPs of one step / the plain step's. ftw[...] rows use "
        f"the single pass and the active-set solver unless named otherwise; 'refresh 8' recomputes the "
        f"target gradient every 8 steps (its FLOPs: a step without the refresh).",
        "",
    ]
    for size, block in results["steps"].items():
        lines += _step_lines(
            f"{size}: N = {block['N']}, k = {block['k']}, T = {block['T']}, model {block['model']}", block["rows"], meta
        )
    if results.get("flop_grid"):
        lines += _grid_lines(results["flop_grid"], meta)
    sw = results["seq_sweep"]
    Ts = sorted({int(t) for res in sw.values() for t in res})
    lines += [
        f"## select / plain step against T (N = {meta['sweep_N']}, k = {meta['sweep_k']}, model {meta['sweep_model']})",
        "",
        f"Medians over {meta.get('sweep_repeats', 1)} interleaved round(s) (plain, each variant's select, plain) "
        f"after a warm-up round; ratio = select / that round's mean plain step. '—': skipped after a select "
        f"exceeded the time cap. Flat within 1.5x = linear in T like the step.",
        "",
        "| backend | " + " | ".join(str(t) for t in Ts) + " | max/min |",
        "|---|" + "---|" * (len(Ts) + 1),
    ]
    for gram, res in sw.items():
        res = {int(t): v for t, v in res.items()}
        ratios = [res[t]["ratio"] for t in Ts if t in res]
        spread = max(ratios) / min(ratios) if ratios else float("nan")
        lines.append(
            f"| {gram} | "
            + " | ".join(f"{res[t]['ratio']:.2f} ({res[t]['select_s']:.2f} s)" if t in res else "—" for t in Ts)
            + f" | {spread:.2f} |"
        )
    lines += [
        "",
        "## Weight QP solve time (ms)",
        "",
        "| solver | " + " | ".join(next(iter(results["solvers"].values()))) + " |",
        "|---|" + "---|" * len(next(iter(results["solvers"].values()))),
    ]
    for name, row in results["solvers"].items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |")
    (out / "speed.md").write_text("\n".join(lines) + "\n")
    _plot_sweep(sw, out / "select_vs_T.png", meta)
    if results["steps"]:
        _plot_steps(results["steps"], out / "step_ratios.png", meta)


def write_lora(results: dict, out: Path) -> None:
    """speed_lora.json and speed_lora.md: the LoRA step tables (``--lora-only``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_lora.json").write_text(jsonio.dumps(results, indent=2))
    meta = results["meta"]
    lines = [
        f"# LoRA step cost ({meta['mode']}, {meta['device_name']})",
        "",
        f"Command: `{meta.get('command', 'python -m benchmarks.speed --lora-only')}` — {meta.get('date', '')}; "
        f"torch {meta.get('torch', '')}, {meta.get('threads', '?')} threads.",
        "",
        f"peft LoRA r = {LORA['r']}, alpha {LORA['alpha']:g} on {', '.join(LORA['target_modules'])}. "
        f"{meta['repeats']} interleaved rounds after a warm-up round (each: the LoRA random step, every other "
        f"row once in an order rotated per round, the LoRA random step again). Times in ms, medians over "
        f"rounds (phases: means); ratio = median over rounds of step / that round's mean LoRA random step "
        f"(the plain LoRA step on the k chosen rows); FLOP ratio = counted matmul + attention FLOPs of one "
        f"step / the LoRA random step's. The full-FT rows train the same model without adapters. One process: "
        f"no collectives, so the ZeRO-3 cost of many thin LoRA layers' factor gathers (fixed by packing them "
        f"into one all-gather, selection/capture.py) does not show here; results/speed_lora/zero3_ab.md has "
        f"the 2-rank before/after.",
        "",
    ]
    for size, block in results["lora"].items():
        lines += _step_lines(
            f"{size}: N = {block['N']}, k = {block['k']}, T = {block['T']}, model {block['model']}", block["rows"], meta
        )
    (out / "speed_lora.md").write_text("\n".join(lines) + "\n")


def write_muon(results: dict, out: Path) -> None:
    """speed_muon.json and speed_muon.md: the Muon step tables (``--muon-only``)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed_muon.json").write_text(jsonio.dumps(results, indent=2))
    meta = results["meta"]
    lines = [
        f"# Muon step cost ({meta['mode']}, {meta['device_name']})",
        "",
        f"Command: `{meta.get('command', 'python -m benchmarks.speed --muon-only')}` — {meta.get('date', '')}; "
        f"torch {meta.get('torch', '')}, {meta.get('threads', '?')} threads.",
        "",
        f"optimizer.name muon (torch.optim.Muon on the hidden 2-D matrices, AdamW on embeddings, head and norms; "
        f"{', '.join(f'{k} {v}' for k, v in MUON.items())}). {meta['repeats']} interleaved rounds after a warm-up "
        f"round (each: the Muon random step, every other row once in an order rotated per round, the Muon random "
        f"step again). Times in ms, medians over rounds (phases: means); ratio = median over rounds of step / that "
        f"round's mean Muon random step (the plain Muon step on the k chosen rows); FLOP ratio = counted matmul + "
        f"attention FLOPs of one step (torch.utils.flop_counter: the NS JVP's and VJP's GEMMs included) / the Muon "
        f"random step's. NS JVP (formula) = ns_steps·(6p²q + 4p³) per Muon matrix for the N candidates and the "
        f"m survivors; share = of FTW's counted step FLOPs. The adamw rows train the same model with AdamW.",
        "",
    ]
    for size, block in results["muon"].items():
        lines += _step_lines(
            f"{size}: N = {block['N']}, k = {block['k']}, T = {block['T']}, model {block['model']}", block["rows"], meta
        )
        for name, r in block["rows"].items():
            if "ns_jvp_flops" in r:
                lines += [
                    f"{name}: NS JVP (formula) {r['ns_jvp_flops'] / 1e9:.2f} GFLOP of {r['flops'] / 1e9:.2f} "
                    f"GFLOP counted ({100 * r['ns_jvp_share']:.0f} %).",
                    "",
                ]
    (out / "speed_muon.md").write_text("\n".join(lines) + "\n")


def _plot_steps(steps: dict, path: Path, meta: dict) -> None:
    """Per size, every method's time ratio and FLOP ratio to the plain step as paired bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(steps), figsize=(6.5 * len(steps), 4.8), squeeze=False)
    for ax, (size, block) in zip(axes[0], steps.items()):
        names = [n for n in block["rows"] if n != "plain"]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [block["rows"][n]["ratio_to_plain"] for n in names], 0.4, label="time")
        ax.bar(
            [i + 0.2 for i in x], [block["rows"][n].get("flop_ratio", float("nan")) for n in names], 0.4, label="FLOPs"
        )
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.1, color="grey", lw=0.8, ls="--", label="1.10x")
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("step / plain step")
        ax.set_title(f"{size}: N {block['N']}, k {block['k']}, T {block['T']} ({meta['device_name']})", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plot_sweep(sw: dict, path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for gram, res in sw.items():
        Ts = sorted(int(t) for t in res)
        ax.plot(Ts, [{int(t): v for t, v in res.items()}[t]["ratio"] for t in Ts], marker="o", label=gram)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("FTW select time / plain step time")
    ax.set_title(f"select / plain vs T ({meta['device_name']}, N = {meta['sweep_N']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="default: results/speed (quick: results/speed_quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-T", type=int, default=None, help="longest T of the sweep (default 4096 CPU, 8192 CUDA)")
    parser.add_argument(
        "--sizes",
        default=None,
        help="comma-separated step-table model sizes (default: both; "
        "none: only the FLOP grid, the T sweep and the solver table)",
    )
    parser.add_argument(
        "--lora-only",
        action="store_true",
        help="only the LoRA step tables (both sizes unless --sizes), written as speed_lora.md / speed_lora.json",
    )
    parser.add_argument(
        "--muon-only",
        action="store_true",
        help="only the Muon step tables (the small size on CPU "
        "unless --sizes), written as speed_muon.md / speed_muon.json",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds per table (default 5; quick 2)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.quick:
        sizes = [("small", 16, 32, 4)]
        repeats, lengths, sweep_n, cap, sweep_size = 2, [128, 256], 8, 30.0, "small"
        sweep_repeats = 1
        grid_T, grid_points = 16, [(16, 4, 4), (64, 4, 4)]
    else:  # (model size, N, T, k): the demo-sized step and a compute-bound one
        sizes = [("small", 64, 32, 16), ("gpu-100m" if cuda else "cpu-compute", 64, 512 if cuda else 256, 16)]
        max_T = args.max_T or (8192 if cuda else 4096)
        lengths = [t for t in (128, 256, 512, 1024, 2048, 4096, 8192) if t <= max_T]
        repeats, sweep_n, cap, sweep_size = 5, 16, 60.0, "gpu-100m" if cuda else "small"
        sweep_repeats = 3
        grid_T, grid_points = 64, FLOP_GRID
    results = {
        "meta": {
            "mode": "quick" if args.quick else "default",
            "device": str(device),
            "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
            "threads": torch.get_num_threads(),
            "repeats": repeats,
            "sweep_N": sweep_n,
            "sweep_k": max(2, sweep_n // 4),
            "sweep_model": sweep_size,
            "sweep_repeats": sweep_repeats,
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python -m benchmarks.speed " + " ".join(argv if argv is not None else sys.argv[1:]),
        },
        "steps": {},
    }
    if args.sizes:
        sizes = [row for row in sizes if row[0] in args.sizes.split(",")]
    if args.repeats is not None:
        repeats = results["meta"]["repeats"] = max(1, args.repeats)
    if args.muon_only:  # the exact NS Jacobian per candidate: the compute-bound size costs minutes a step on CPU
        sizes = [row for row in sizes if cuda or args.sizes or row[0] == "small"]
        results["muon"] = {
            size: {
                "N": n,
                "T": T,
                "k": k,
                "model": f"hidden/layers/ffn {SIZES[size]}",
                "rows": muon_table(device, n, T, k, repeats, size),
            }
            for size, n, T, k in sizes
        }
        out = Path(args.out or ("results/speed_muon_quick" if args.quick else "results/speed_muon"))
        write_muon(results, out)
        print((out / "speed_muon.md").read_text())
        return results
    if args.lora_only:
        results["lora"] = {
            size: {
                "N": n,
                "T": T,
                "k": k,
                "model": f"hidden/layers/ffn {SIZES[size]}",
                "rows": lora_table(device, n, T, k, repeats, size),
            }
            for size, n, T, k in sizes
        }
        out = Path(args.out or ("results/speed_lora_quick" if args.quick else "results/speed_lora"))
        write_lora(results, out)
        print((out / "speed_lora.md").read_text())
        return results
    for size, n, T, k in sizes:
        results["steps"][size] = {
            "N": n,
            "T": T,
            "k": k,
            "model": f"hidden/layers/ffn {SIZES[size]}",
            "rows": step_table(device, n, T, k, repeats, size),
        }
    grid_size = "small" if args.quick else ("gpu-100m" if cuda else "cpu-compute")
    results["meta"].update(grid_model=f"{grid_size} {SIZES[grid_size]}", grid_T=grid_T)
    results["flop_grid"] = flop_grid(device, grid_T, grid_size, grid_points)
    results["seq_sweep"] = seq_sweep(device, sweep_n, max(2, sweep_n // 4), lengths, sweep_repeats, cap, sweep_size)
    results["solvers"] = solver_table()
    out = Path(args.out or ("results/speed_quick" if args.quick else "results/speed"))
    write(results, out)
    print((out / "speed.md").read_text())
    return results


if __name__ == "__main__":
    main()
