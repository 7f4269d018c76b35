"""FTW on sharded optimizer state: FSDP2 (DTensor Shard(0)) and DeepSpeed ZeRO-3 (flat slices).

One 2-rank gloo spawn per engine trains a tiny float32 Llama whose dimensions are odd (hidden 27,
intermediate 45: uneven FSDP2 row chunks, ZeRO-3 slices that cut through rows and end in padding)
for 2 real optimizer steps, then runs FTW with each rank passing its half of the pool and of the
target. In the parent, a plain model with the gathered weights and a torch AdamW whose state is
set to the gathered moments runs FTW with R = 1 on the whole pool: alignment, utility, filtered,
gram, indices and weights must agree, before the first step (P = I) and after it, for the exact,
ghost and sketch backends. The reads are instrumented: every moment tensor a reader returns has at
most ceil(numel / R) elements (FSDP2: ceil(rows / R) rows), blocks of the two ranks tile each weight exactly once, and no
full-tensor gather (DTensor.full_tensor, safe_get_full_*) runs during selection.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math

import pytest
import torch

from optsel.pipeline.engines import fsdp2_view, zero3_view
from optsel.pipeline.engines.zero3_view import flat_range_blocks
from optsel.selection.cost_model import HeadStageShape, head_stage_cost
from optsel.selection.ftw import FilterThenWeight, FTWConfig
from optsel.selection.model_view import make_state_reader
from optsel.selection.preconditioner import TorchAdamStateReader

from support.bruteforce import brute_force, make_batch, odd_llama
from support.common import REPO
from support.dist import run_distributed

ZERO3_JSON = REPO / "configs" / "deepspeed" / "zero3.json"
BETAS, EPS, TRAIN_STEPS = (0.9, 0.95), 1e-8, 2
N_POOL, N_TARGET, N_TRAIN = 12, 4, 8
# "<gram>" alone: exchange="factors"; "+exchange": exchange="sketches"; "+direction": exchange="direction"
BACKENDS = (
    "exact",
    "ghost",
    "sketch",
    "sketch+exchange",
    "exact+direction",
    "ghost+direction",
    "sketch+direction",
    "auto+direction",
)
DIRECTION = tuple(b for b in BACKENDS if b.endswith("+direction"))
FIELDS = ("alignment", "utility", "gram", "filtered", "indices", "weights")


def ftw_config(gram: str) -> FTWConfig:
    base, _, suffix = gram.partition("+")
    exchange = {"": "factors", "exchange": "sketches", "direction": "direction"}[suffix]
    return FTWConfig(
        budget=4,
        filter_size=8,
        gram=base,
        compute_dtype="float64",
        sketch_dim_out=6,
        sketch_dim_in=6,
        exchange=exchange,
    )


TWO_STAGE = FTWConfig(
    budget=4,
    filter_size=7,
    gram="exact",
    compute_dtype="float64",
    exchange="direction",
    prefilter="head",
    prefilter_window=6,
)  # 7 survivors on 2 ranks: one rank pads
LEARNED = dataclasses.replace(
    TWO_STAGE, prefilter="learned", prefilter_window=None, prefilter_learn_steps=1, prefilter_features=16
)
LEARNED_SCORE = dataclasses.replace(  # a labelling step, then the k best by û (with the overlap features)
    LEARNED, prefilter_stage2="score", prefilter_overlap=True
)


def half(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def pool_batch():
    return make_batch(N_POOL, 8, seed=7)


def target_batch():
    return make_batch(N_TARGET, 8, seed=8)


CHUNK_TOKENS = 12  # token positions per capture pass: length-sorted passes, each cut to its longest row


def uneven_pool() -> dict[str, torch.Tensor]:
    """The pool with rank 1's half cut to 3 tokens: under ``CHUNK_TOKENS`` the ranks' length-sorted plans
    differ in pass count, so a sharded engine's ranks must agree one (or hang in their gathers)."""
    b = pool_batch()
    cut = (torch.arange(N_POOL)[:, None] >= N_POOL // 2) & (torch.arange(b["input_ids"].shape[1])[None] >= 3)
    return {
        "input_ids": b["input_ids"].masked_fill(cut, 0),
        "attention_mask": b["attention_mask"].masked_fill(cut, 0),
        "labels": b["labels"].masked_fill(cut, -100),
    }


def chunked_configs() -> dict[str, FTWConfig]:
    return {
        "one_stage": dataclasses.replace(ftw_config("exact+direction"), capture_chunk_tokens=CHUNK_TOKENS),
        "two_stage": dataclasses.replace(TWO_STAGE, capture_chunk_tokens=CHUNK_TOKENS),
    }


def _learned_fields(sel) -> dict:
    """What a learned stage 1's selection must agree on (a scored step has no Gram nor FTW's diagnostics)."""
    return {f: getattr(sel, f).clone() for f in ("indices", "weights", "alignment", "utility")}


def _sel_fields(sel) -> dict:
    out = {f: getattr(sel, f).clone() for f in FIELDS}
    out["covered"] = list(sel.covered)
    out["comm_bytes"] = sel.diagnostics["comm_bytes"]
    out["rho"], out["tau"] = sel.diagnostics["momentum_coef"], sel.diagnostics["curvature"]
    out["optimizer_step"] = sel.diagnostics["optimizer_step"]
    out["comm_by_phase"] = dict(sel.diagnostics["comm_by_phase"])
    out["gram_backends"] = dict(sel.diagnostics["gram_backends"])
    out["engine_bytes"] = sel.diagnostics["engine_bytes_estimate"]
    return out


class _Probe:
    """Records what the sharded readers hand out and counts full-tensor gathers (child process)."""

    def __init__(self):
        from torch.distributed.tensor import DTensor

        self.reads: list[dict] = []
        self.full_gathers = 0
        self.active = False
        probe = self
        for cls in (fsdp2_view.FSDP2StateReader, zero3_view.ZeRO3StateReader):
            original = cls.read

            def read(reader, param, _original=original):
                state = _original(reader, param)
                if probe.active:
                    from optsel.selection.preconditioner import shape_2d

                    d0, d1 = shape_2d(zero3_view.full_shape(param))
                    probe.reads.append(
                        {
                            "numel": d0 * d1,
                            "rows": d0,
                            "cols": d1,
                            "id": id(param),
                            "moment_numels": [
                                t.numel() for b in state.blocks for t in (b.exp_avg, b.exp_avg_sq) if t is not None
                            ],
                            "blocks": [(b.rows.start, b.rows.stop, b.cols.start, b.cols.stop) for b in state.blocks],
                        }
                    )
                return state

            cls.read = read

        def counting(fn):
            def wrapper(*args, **kwargs):
                if probe.active:
                    probe.full_gathers += 1
                return fn(*args, **kwargs)

            return wrapper

        DTensor.full_tensor = counting(DTensor.full_tensor)
        try:
            import deepspeed.utils as ds_utils
            from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Z3

            for name in ("safe_get_full_optimizer_state", "safe_get_full_fp32_param"):
                setattr(ds_utils, name, counting(getattr(ds_utils, name)))
            Z3.get_full_hp_param = counting(Z3.get_full_hp_param)
        except ImportError:  # pragma: no cover - deepspeed is installed
            pass


@contextlib.contextmanager
def _wire_bytes():
    """Bytes of every torch.distributed all_reduce / broadcast / all_gather that optsel.distributed
    issues inside (the selector's collectives; the engines' own ones, e.g. DeepSpeed's coordinator
    checks during the capture forward, are counted apart as "engine_calls")."""
    import sys

    import torch.distributed as dist

    wire = {"all_reduce": 0, "broadcast": 0, "all_gather": 0, "size_exchange": 0, "engine_calls": 0}
    originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast", "all_gather")}

    def wrap(name):
        def call(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") != "optsel.distributed":
                wire["engine_calls"] += 1
            elif name == "all_gather":
                outs = args[0]
                nbytes = sum(t.numel() * t.element_size() for t in outs)
                single_int = all(t.numel() == 1 and t.dtype == torch.int64 for t in outs)
                wire["size_exchange" if single_int else name] += nbytes
            else:
                wire[name] += args[0].numel() * args[0].element_size()
            return originals[name](*args, **kwargs)

        return call

    for name in originals:
        setattr(dist, name, wrap(name))
    try:
        yield wire
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def _full_state(engine) -> dict:
    """Gathered weights / moments / step (collective, in the TEST only; after the probe is off)."""
    weights, moments, step = {}, {}, 0
    opt = engine.optimizer
    for name, p in engine.unwrapped_model.named_parameters():
        if engine.name == "deepspeed":
            from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

            weights[name] = safe_get_full_fp32_param(p).detach().cpu().clone()
            m = safe_get_full_optimizer_state(p, "exp_avg") if opt.optimizer.state else None
            v = safe_get_full_optimizer_state(p, "exp_avg_sq") if opt.optimizer.state else None
            if opt.optimizer.state:
                step = int(next(iter(opt.optimizer.state.values()))["step"])
        else:
            weights[name] = p.full_tensor().detach().cpu().clone()
            st = opt.state.get(p, {})
            m = st["exp_avg"].full_tensor() if st else None
            v = st["exp_avg_sq"].full_tensor() if st else None
            step = int(st["step"]) if st else step
        if m is not None:
            moments[name] = (
                m.detach().cpu().reshape(weights[name].shape).clone(),
                v.detach().cpu().reshape(weights[name].shape).clone(),
            )
    return {"weights": weights, "moments": moments, "step": step}


def _body(rank: int, world: int, engine_name: str, ds_config_path: str) -> dict:
    from benchmarks.ranks import collective_counter
    from optsel.pipeline.engines.shared import EngineConfig, OptimizerConfig, build_engine

    probe = _Probe()
    engine = build_engine(
        EngineConfig(name=engine_name, deepspeed_config=ds_config_path),
        odd_llama(),
        OptimizerConfig(lr=1e-2, betas=BETAS, eps=EPS, schedule="constant", grad_clip=1.0),
        total_steps=TRAIN_STEPS + 1,
        micro_batch_size=N_TRAIN // world,
    )
    model, opt = engine.unwrapped_model, engine.optimizer
    pool, target = half(pool_batch(), rank, world), half(target_batch(), rank, world)
    out: dict = {"reader": type(make_state_reader(opt, "adam")).__name__}

    probe.active = True
    ftw = FilterThenWeight(model, opt, ftw_config("exact"))
    out["names"] = {id(p): n for n, p in model.named_parameters()}  # the sharded params (FTW resharded)
    out["before"] = _sel_fields(ftw.select(pool, target))
    probe.active = False
    out["state_before"] = _full_state(engine)

    for s in range(TRAIN_STEPS):  # identical global data, half per rank
        engine.forward_backward(
            half(make_batch(N_TRAIN, 8, seed=100 + s), rank, world),
            torch.full((N_TRAIN // world,), 1.0 / N_TRAIN),
            loss_scale=float(world),
        )
        engine.step()

    probe.active = True
    out["after"], out["wire_bytes"], out["dispatch"] = {}, {}, {}
    for gram in BACKENDS:
        ftw = FilterThenWeight(model, opt, ftw_config(gram))
        with _wire_bytes() as wire, collective_counter(world) as dispatch:  # DTensor's collectives too
            out["after"][gram] = _sel_fields(ftw.select(pool, target))
        out["wire_bytes"][gram], out["dispatch"][gram] = wire, dispatch.totals()["selector"]
    # direction_cache: the target kept for 2 steps, no optimizer step in between, so the 2nd select reuses M;
    # direction_dtype bfloat16: M crosses ranks in 2 bytes an element
    cached = FilterThenWeight(
        model, opt, dataclasses.replace(ftw_config("sketch+direction"), target_refresh=2, direction_cache=True)
    )
    out["cache"] = [_sel_fields(cached.select(pool, target)) for _ in range(2)]
    bf16 = dataclasses.replace(ftw_config("sketch+direction"), direction_dtype="bfloat16")
    out["bf16"] = _sel_fields(FilterThenWeight(model, opt, bf16).select(pool, target))
    probe.active = False
    out["state_after"] = _full_state(engine)
    out["reads"], out["full_gathers"] = probe.reads, probe.full_gathers
    # two-stage FTW (prefilter: head, a 6-token window): survivors split unevenly over the ranks, padded;
    # the engine trains from the survivors' single pass in pool numbering
    sel = FilterThenWeight(model, opt, TWO_STAGE).select(pool, target)
    out["two_stage"] = _sel_fields(sel)
    out["two_stage"]["survivors_here"] = int(sel.pool_pass.row_map.ge(0).sum()) if sel.pool_pass else -1
    rows, weights = sel.local_indices, sel.local_weights.float()
    if rows.numel() == 0:
        rows, weights = torch.zeros(1, dtype=torch.long), torch.zeros(1)
    losses = engine.backward_from_pass(sel.pool_pass, rows, weights, loss_scale=float(world))
    out["two_stage"]["local"] = (sel.local_indices.clone(), losses[: sel.local_indices.numel()].clone())
    head_only = dataclasses.replace(TWO_STAGE, prefilter_stage2="head")  # survivors' head factors all-gathered
    out["two_stage_head"] = _sel_fields(FilterThenWeight(model, opt, head_only).select(pool, target))
    # the early exit: stage 1 runs no decoder block (a skipped block's shards are never gathered)
    early = dataclasses.replace(TWO_STAGE, prefilter_depth=0)
    out["two_stage_depth"] = _sel_fields(FilterThenWeight(model, opt, early).select(pool, target))
    # the learned stage 1: a learning step (the whole pool to stage 2), then a scored step (features all-gathered,
    # the regression fitted on stage 2's utilities: the same statistics on every rank)
    for name, cfg in (("two_stage_learned", LEARNED), ("two_stage_score", LEARNED_SCORE)):
        learned = FilterThenWeight(model, opt, cfg)
        out[name] = [_learned_fields(learned.select(pool, target)) for _ in range(2)]
    # length-sorted capture passes under a token budget on a pool whose halves differ in length: the ranks
    # plan different pass counts and must run the same number of forwards (agreed), or the engine's gathers hang
    forwards: list[int] = []
    hook = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    out["chunked"] = {}
    try:
        for name, cfg in chunked_configs().items():
            out["chunked"][name] = _sel_fields(
                FilterThenWeight(model, opt, cfg).select(half(uneven_pool(), rank, world), target)
            )
    finally:
        hook.remove()
    out["forwards"] = len(forwards)
    engine.close() if hasattr(engine, "close") else None
    return out


# -- the R = 1 reference, in the parent -------------------------------------------------------------


def _reference(
    state: dict,
    gram: str,
    dtype=torch.float32,
    config: FTWConfig | None = None,
    pool: dict | None = None,
    selects: int = 1,
    fields=_sel_fields,
) -> tuple[dict, torch.nn.Module, torch.optim.Optimizer]:
    """One process's selection (the last of ``selects`` calls of one selector) from the ranks' gathered state."""
    model = odd_llama()
    model.load_state_dict(state["weights"])
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=BETAS, eps=EPS, weight_decay=0.0)
    params = dict(model.named_parameters())
    for name, (m, v) in state["moments"].items():
        opt.state[params[name]] = {
            "step": torch.tensor(float(state["step"])),
            "exp_avg": m.to(dtype).clone(),
            "exp_avg_sq": v.to(dtype).clone(),
        }
    ftw = FilterThenWeight(model, opt, config or ftw_config(gram))
    for _ in range(selects):
        sel = ftw.select(pool if pool is not None else pool_batch(), target_batch())
    return fields(sel), model, opt


def _check_two_stage(results: list[dict]) -> None:
    """Two-stage FTW on 2 ranks selects what it selects on one process, and each rank's single pass
    (survivors only) gives the chosen rows' own losses."""
    from optsel.losses import per_sample_token_mean_ce

    ref, model, _ = _reference(results[0]["state_after"], "exact", config=TWO_STAGE)
    head_ref, _, _ = _reference(
        results[0]["state_after"], "exact", config=dataclasses.replace(TWO_STAGE, prefilter_stage2="head")
    )
    depth_ref, _, _ = _reference(
        results[0]["state_after"], "exact", config=dataclasses.replace(TWO_STAGE, prefilter_depth=0)
    )
    learned_ref = {
        name: [
            _reference(results[0]["state_after"], "exact", config=cfg, selects=n, fields=_learned_fields)[0]
            for n in (1, 2)
        ]
        for name, cfg in (("two_stage_learned", LEARNED), ("two_stage_score", LEARNED_SCORE))
    }
    for rank, res in enumerate(results):
        for name, step in ((name, step) for name in learned_ref for step in range(2)):
            got, want, where = res[name][step], learned_ref[name][step], f"{name} rank {rank} step {step}"
            assert torch.equal(got["indices"], want["indices"]), (where, got["indices"], want["indices"])
            torch.testing.assert_close(got["weights"], want["weights"], rtol=1e-4, atol=1e-6, msg=where)
            for f in ("alignment", "utility"):  # b: exact at the survivors, NaN (not computed) elsewhere
                torch.testing.assert_close(got[f], want[f], rtol=1e-4, atol=1e-4, equal_nan=True, msg=where)
        _assert_same(res["two_stage"], ref, f"two-stage rank {rank}")
        _assert_same(res["two_stage_head"], head_ref, f"two-stage head-only rank {rank}")
        _assert_same(res["two_stage_depth"], depth_ref, f"two-stage early exit rank {rank}")
    # stage 1's traffic is what the cost model says it is (target gather, the head's M and P, 2N scores)
    stage1 = head_stage_cost(
        HeadStageShape(
            n=N_POOL,
            window=6,
            hidden=27,
            vocab=model.config.vocab_size,
            target_rows=N_TARGET,
            target_len=8,
            scored_target_rows=N_TARGET,
            forward_flops_per_token=0.0,
            survivors=7,
            world=len(results),
            esz=8,
        )
    )
    for rank, res in enumerate(results):
        phases = res["two_stage"]["comm_by_phase"]
        measured = phases.get("stage1_target", 0) + phases.get("stage1", 0)
        assert measured == stage1.bytes, (rank, phases, stage1.bytes)
    here = [r["two_stage"]["survivors_here"] for r in results]
    assert sum(here) == TWO_STAGE.filter_size and here[0] != here[1]  # uneven: the padding rows ran
    pool = pool_batch()
    with torch.no_grad():
        own = per_sample_token_mean_ce(
            model(input_ids=pool["input_ids"], attention_mask=pool["attention_mask"]).logits, pool["labels"]
        ).loss
    per = pool["input_ids"].shape[0] // len(results)
    for rank, res in enumerate(results):
        rows, losses = res["two_stage"]["local"]
        torch.testing.assert_close(losses.double(), own[rows + rank * per].double(), rtol=1e-4, atol=1e-5)


def _assert_same(got: dict, ref: dict, where: str) -> None:
    assert got["covered"] == ref["covered"], where
    for f in ("filtered", "indices"):
        assert torch.equal(got[f], ref[f]), (where, f, got[f], ref[f])
    for f in ("alignment", "utility", "gram"):
        scale = float(ref[f].abs().max())
        torch.testing.assert_close(got[f], ref[f], rtol=1e-4, atol=1e-4 * scale, msg=lambda m, f=f: f"{where} {f}: {m}")
    torch.testing.assert_close(
        got["weights"], ref["weights"], rtol=1e-4, atol=1e-5, msg=lambda m: f"{where} weights: {m}"
    )


def _check(results: list[dict], engine_name: str) -> None:
    r0, r1 = results
    assert r0["reader"] == r1["reader"] == {"fsdp2": "FSDP2StateReader", "deepspeed": "ZeRO3StateReader"}[engine_name]

    # both ranks return the same selection
    for key in ("before",):
        for f in FIELDS:
            assert torch.equal(r0[key][f], r1[key][f]), (key, f)
    for gram in BACKENDS:
        for f in FIELDS:
            assert torch.equal(r0["after"][gram][f], r1["after"][gram][f]), (gram, f)

    # the engine really stepped, and the reader saw that step (bias correction uses it)
    assert r0["state_after"]["step"] == TRAIN_STEPS and r0["state_before"]["moments"] == {}
    assert r0["before"]["optimizer_step"] == 0 and r0["after"]["exact"]["optimizer_step"] == TRAIN_STEPS

    # R = 2 equals R = 1 on the same global pool and model / optimizer state
    ref, _, _ = _reference(r0["state_before"], "exact")
    _assert_same(r0["before"], ref, f"{engine_name} before the first step")
    for gram in BACKENDS:
        # auto weighs bytes, which one process does not move (R = 1 picks by FLOPs): the R = 1 reference runs what
        # R = 2 chose (sketch: the survivors' m·T·Σd factors cost far more than their m·k_o·k_i sketches)
        ref, _, _ = _reference(r0["state_after"], gram.replace("auto", "sketch"))
        if gram.startswith("auto"):
            assert set(r0["after"][gram]["gram_backends"].values()) == {"sketch"}
            assert "exact" in set(_reference(r0["state_after"], gram)[0]["gram_backends"].values())  # by FLOPs
        _assert_same(r0["after"][gram], ref, f"{engine_name} {gram}")
        # every selector collective is counted (pool halves are equal: all-gathers carry no padding);
        # only the one-int size exchanges inside all_gather_cat are not
        for r in results:
            # every collective the selector issued, c10d and DTensor's functional ones, seen by a
            # TorchDispatchMode: exactly what its CommCounter says
            assert r["dispatch"][gram]["bytes"] == r["after"][gram]["comm_bytes"], (gram, r["dispatch"][gram])
            assert sum(r["after"][gram]["comm_by_phase"].values()) == r["after"][gram]["comm_bytes"], gram
            if gram in DIRECTION:  # the M gathers of FSDP2 are DTensor redistributes: not dist.all_gather
                continue
            wire = r["wire_bytes"][gram]
            counted = wire["all_reduce"] + wire["broadcast"] + wire["all_gather"]
            assert counted > 0 and r["after"][gram]["comm_bytes"] >= counted, (gram, wire, r["after"][gram])
            assert r["after"][gram]["comm_bytes"] <= counted + wire["size_exchange"], (gram, wire)

    # exchanging sketches only: a fraction of the factor exchange's bytes (here T·(d_in + d_out) = 8·(27 + 24) per
    # sample and layer for q_proj vs k_o·k_i = 36)
    light, heavy = r0["after"]["sketch+exchange"]["comm_bytes"], r0["after"]["sketch"]["comm_bytes"]
    assert light < 0.25 * heavy, (light, heavy)

    # exchange="direction": b is the factors exchange's exact b (R = 2 against R = 2), K too with exact
    # factors shipped for the survivors; it gathers M (and P for exact) instead of every candidate's factors
    exact = r0["after"]["exact"]
    for gram in DIRECTION:
        got = r0["after"][gram]
        scale = float(exact["alignment"].abs().max())
        torch.testing.assert_close(got["alignment"], exact["alignment"], rtol=1e-6, atol=1e-9 * scale)
        assert got["comm_by_phase"].get("gather", 0) > 0, got["comm_by_phase"]
        # exact / ghost still ship the m = 8 survivors' factors (of N = 12 here); sketch ships their sketches
        bound = 0.3 if gram.startswith(("sketch", "auto")) else 1.0
        assert got["comm_bytes"] < bound * exact["comm_bytes"], (gram, got["comm_bytes"], exact["comm_bytes"])
    _assert_same(r0["after"]["exact+direction"], exact, f"{engine_name} exact+direction vs exact factors")
    m_elems = sum(math.prod(w.shape) for n, w in r0["state_after"]["weights"].items() if n in exact["covered"])
    # the sketch+direction step moves M once (float64 here; FSDP2 pads uneven row chunks) and little else
    assert 8 * m_elems <= r0["after"]["sketch+direction"]["comm_bytes"] < 8 * m_elems * 1.8, (
        m_elems,
        r0["after"]["sketch+direction"]["comm_by_phase"],
    )

    # the engine's own traffic per step that the Prometheus ratio divides by: 3 × the fp32 parameters' bytes
    params = sum(math.prod(w.shape) for w in r0["state_after"]["weights"].values())
    assert r0["after"]["exact"]["engine_bytes"] == 3 * 4 * params and ref["engine_bytes"] == 0
    first, second = r0["cache"]
    assert torch.equal(second["alignment"], first["alignment"])  # the same M, not gathered again
    assert first["comm_by_phase"]["gather"] - second["comm_by_phase"]["gather"] >= 8 * m_elems, (first, second)
    assert second["comm_by_phase"].get("target", 0) == 0 < first["comm_by_phase"]["target"]
    full, half_ = r0["after"]["sketch+direction"], r0["bf16"]  # bfloat16 M: 6 bytes an element fewer, b rounded
    assert full["comm_bytes"] - half_["comm_bytes"] >= 6 * m_elems, (full["comm_bytes"], half_["comm_bytes"])
    err = float((half_["alignment"] - exact["alignment"]).abs().max() / exact["alignment"].abs().max())
    assert 0 < err < 1e-2, err

    # no rank ever held more than its share of a moment; the two ranks' blocks tile every weight once
    per_rank: list[dict[str, list]] = []
    for r in results:
        assert r["full_gathers"] == 0, r["full_gathers"]
        assert r["reads"], "the sharded reader was never called"
        seen: dict[str, list] = {}
        for rec in r["reads"]:
            # ZeRO-3: a flat slice of ceil(numel / R); FSDP2: a row block of ceil(rows / R) rows
            share = (
                math.ceil(rec["numel"] / 2) if engine_name == "deepspeed" else math.ceil(rec["rows"] / 2) * rec["cols"]
            )
            assert all(n <= share for n in rec["moment_numels"]), (share, rec)
            assert sum(rec["moment_numels"]) <= 2 * share, rec
            seen.setdefault(r["names"][rec["id"]], []).append((rec["rows"], rec["cols"], rec["blocks"]))
        assert any(rec["moment_numels"] for rec in r["reads"])  # moments were read, after the steps
        per_rank.append(seen)
    assert set(per_rank[0]) == set(per_rank[1]) == set(r0["after"]["exact"]["covered"])
    for name in per_rank[0]:  # every read on each rank: together the two ranks hold each element once
        for (rows, cols, blocks0), (_, _, blocks1) in zip(per_rank[0][name], per_rank[1][name]):
            hits = torch.zeros(rows, cols, dtype=torch.int64)
            for b in blocks0 + blocks1:
                hits[b[0] : b[1], b[2] : b[3]] += 1
            assert bool((hits == 1).all()), (name, blocks0, blocks1)
    if engine_name == "deepspeed":  # slices cut through rows: some rank holds a partial-row block
        assert any(
            b[1] - b[0] == 1 and b[3] - b[2] < cols
            for pr in per_rank
            for reads in pr.values()
            for _, cols, bl in reads
            for b in bl
        )


def _check_bruteforce(results: list[dict]) -> None:
    """The exact backend (R = 1, float64 copy of the trained state) equals explicit per-sample gradients
    (1e-5: Llama's eager attention takes its softmax in float32, on padded vs unpadded rows)."""
    for gram in ("exact", "exact+direction"):
        sel, model, opt = _reference(results[0]["state_after"], gram, torch.float64)
        cfg = ftw_config(gram)
        b, K, u = brute_force(
            model,
            opt,
            pool_batch(),
            target_batch(),
            sel["covered"],
            sel["rho"],
            sel["tau"],
            batch_share=cfg.budget if cfg.filter_curvature == "batch" else None,
        )
        torch.testing.assert_close(sel["alignment"], b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))
        torch.testing.assert_close(sel["utility"], u, rtol=1e-5, atol=1e-7 * float(u.abs().max()))
        torch.testing.assert_close(
            sel["gram"], K[sel["filtered"]][:, sel["filtered"]], rtol=1e-5, atol=1e-7 * float(K.abs().max())
        )


# -- tests --------------------------------------------------------------------------------------------


def test_flat_range_blocks_tiles_rows_and_skips_padding():
    shape = (5, 7)  # numel 35; R = 3 → partition 12: [0,12) [12,24) [24,36) with 1 padding element
    blocks = [flat_range_blocks(r * 12, (r + 1) * 12, shape) for r in range(3)]
    assert blocks[0] == [(slice(0, 1), slice(0, 7), 0, 7), (slice(1, 2), slice(0, 5), 7, 12)]
    assert blocks[1] == [
        (slice(1, 2), slice(5, 7), 0, 2),
        (slice(2, 3), slice(0, 7), 2, 9),
        (slice(3, 4), slice(0, 3), 9, 12),
    ]  # three blocks: partial, whole, partial
    assert blocks[2] == [(slice(3, 4), slice(3, 7), 0, 4), (slice(4, 5), slice(0, 7), 4, 11)]
    # element-exact: every flat index lands once, at the right (row, col) and local offset
    full = torch.arange(35.0).reshape(shape)
    hit = torch.zeros(shape)
    for r in range(3):
        local = torch.cat([full.reshape(-1), torch.full((1,), -1.0)])[r * 12 : (r + 1) * 12]
        for rows, cols, lo, hi in blocks[r]:
            assert torch.equal(local[lo:hi].view(rows.stop - rows.start, cols.stop - cols.start), full[rows, cols])
            hit[rows, cols] += 1
    assert torch.equal(hit, torch.ones(shape))
    assert flat_range_blocks(36, 48, shape) == []  # a rank holding only padding holds no block
    assert flat_range_blocks(0, 14, (2, 7)) == [(slice(0, 2), slice(0, 7), 0, 14)]


def test_make_state_reader_picks_plain_and_rejects_zero12():
    model = odd_llama()
    assert isinstance(make_state_reader(torch.optim.AdamW(model.parameters()), "adam"), TorchAdamStateReader)

    class DeepSpeedZeroOptimizer:  # the class name is what identifies ZeRO-1/2's wrapper
        partition_gradients = True
        optimizer = torch.optim.AdamW(model.parameters())

    with pytest.raises(TypeError, match="ZeRO stage 2"):
        make_state_reader(DeepSpeedZeroOptimizer(), "adam")


def _check_chunked(results: list[dict]) -> None:
    """Length-sorted capture passes: the ranks planned different pass counts, ran the same number of forwards,
    and select what one process selects on the whole pool."""
    from optsel.selection.capture import plan_chunks

    counts = [len(plan_chunks(half(uneven_pool(), r, 2), chunk_tokens=CHUNK_TOKENS)) for r in range(2)]
    assert counts[0] != counts[1], counts  # the agreement is exercised
    assert results[0]["forwards"] == results[1]["forwards"] > 0
    for name, cfg in chunked_configs().items():
        ref, _, _ = _reference(results[0]["state_after"], "exact", config=cfg, pool=uneven_pool())
        for rank, res in enumerate(results):
            _assert_same(res["chunked"][name], ref, f"chunked {name} rank {rank}")


@pytest.mark.distributed
def test_ftw_fsdp2_two_ranks_equals_one():
    results = run_distributed(_body, 2, args=("fsdp2", ""), init="fsdp2", timeout_s=300)
    _check(results, "fsdp2")
    _check_bruteforce(results)
    _check_two_stage(results)
    _check_chunked(results)


@pytest.mark.distributed
def test_ftw_zero3_two_ranks_equals_one(tmp_path):
    raw = json.loads(ZERO3_JSON.read_text())
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # make the tiny model shard
    path = tmp_path / "zero3_ftw.json"
    path.write_text(json.dumps(raw))
    results = run_distributed(_body, 2, args=("deepspeed", str(path)), init="deepspeed", timeout_s=300)
    _check(results, "deepspeed")
    _check_bruteforce(results)
    _check_two_stage(results)
    _check_chunked(results)
    # the ZeRO-3 model really shards, unevenly, with padding (gate_proj: 45·27 = 1215 elements)
    assert any(rec["numel"] == 1215 for rec in results[0]["reads"])
