"""``optimizer.name: muon`` in the engines and the run config, and FTW's Muon geometry under FSDP2.

- MuonAdamW (pipeline/engines/muon.py) steps exactly as torch.optim.Muon + torch.optim.AdamW on the
  same split, and its state dict round-trips.
- The run config refuses what cannot work, naming the key (ZeRO-3 + Muon, geometry adam on Muon, ...).
- FSDP2, 2 gloo ranks: a tiny float32 Llama trained 2 real steps with Muon + AdamW on Shard(0) DTensors,
  then FTW (geometry auto, exchange direction) with each rank passing its half of the pool and target.
  In the parent, a plain model with the gathered weights and torch.optim.Muon + AdamW holding the
  gathered momentum buffers / moments runs FTW with R = 1 on the whole pool (R = 2 ≡ R = 1), and its
  float64 copy equals the brute force of tests/test_muon_geometry.py (the real Muon step's Jacobian).
  A fresh engine resumed from the DCP checkpoint holds the same momentum buffers and selects the same.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from optsel.config_loader import ConfigError
from optsel.pipeline.engines.muon import MuonAdamW, build_optimizer, split_muon_params
from optsel.pipeline.engines.shared import OptimizerConfig
from optsel.selection.ftw import FilterThenWeight, FTWConfig

from support.bruteforce import make_batch, odd_llama
from support.common import REPO
from support.dist import run_distributed
from support.muon import _brute

CONFIGS = REPO / "configs"
LR, MUON_LR, TRAIN_STEPS, N_POOL, N_TARGET, N_TRAIN = 1e-2, 2e-2, 2, 8, 4, 8
OPTIM = dict(
    name="muon", lr=LR, muon_lr=MUON_LR, muon_momentum=0.9, betas=(0.9, 0.95), schedule="constant", grad_clip=0.0
)
CFG = FTWConfig(budget=3, filter_size=6, geometry="auto", exchange="direction", compute_dtype="float64")
CFG_MUON = dataclasses.replace(CFG, geometry="muon")  # P = I on the AdamW layers


def _loss(model, batch):
    from optsel.losses import per_sample_token_mean_ce

    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return per_sample_token_mean_ce(logits, batch["labels"]).loss.mean()


def test_split_rule_and_override():
    model = odd_llama()
    muon, adam = split_muon_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)].split(".")[-2] for p in muon} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    assert {names[id(p)] for p in adam} >= {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    muon, adam = split_muon_params(model, ["*.mlp.*"])
    assert {names[id(p)].split(".")[-2] for p in muon} == {"gate_proj", "up_proj", "down_proj"}


def test_muon_adamw_steps_as_torch_muon_and_adamw():
    a, b = odd_llama(torch.float64), odd_llama(torch.float64)
    opt_a = build_optimizer(a, list(a.parameters()), OptimizerConfig(**OPTIM))
    assert isinstance(opt_a, MuonAdamW)
    muon_b, adam_b = split_muon_params(b)
    opts_b = [
        torch.optim.Muon(muon_b, lr=MUON_LR, momentum=0.9, weight_decay=0.0),
        torch.optim.AdamW(adam_b, lr=LR, betas=(0.9, 0.95), weight_decay=0.0),
    ]
    for s in range(2):
        batch = make_batch(4, 8, seed=50 + s)
        for model, opts in ((a, [opt_a]), (b, opts_b)):
            for o in opts:
                o.zero_grad()
            _loss(model, batch).backward()
            for o in opts:
                o.step()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    fresh = build_optimizer(a, list(a.parameters()), OptimizerConfig(**OPTIM))
    fresh.load_state_dict(opt_a.state_dict())
    q = a.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(fresh.state[q]["momentum_buffer"], opt_a.state[q]["momentum_buffer"])
    assert fresh.optimizers[0].state is fresh.state  # the inner optimizers see the loaded state


def test_run_config_refusals_name_the_key():
    from optsel.pipeline.train.run_config import load_run_config

    cfg = load_run_config(CONFIGS / "muon.yaml")
    assert cfg.optimizer.name == "muon" and cfg.engine.name == "fsdp2"
    with pytest.raises(ConfigError, match="optimizer.name"):
        load_run_config(CONFIGS / "muon.yaml", ["engine.name=deepspeed"])
    with pytest.raises(ConfigError, match="selection.options.ftw.geometry"):
        load_run_config(CONFIGS / "muon.yaml", ["selection.options.ftw.geometry=adam"])
    with pytest.raises(ConfigError, match="selection.options.ftw.geometry"):
        load_run_config(CONFIGS / "muon.yaml", ["optimizer.name=adamw", "selection.options.ftw.geometry=muon"])
    with pytest.raises(ValueError, match="muon_momentum"):
        OptimizerConfig(name="muon", muon_momentum=1.0)
    from optsel.pipeline.engines.shared import EngineConfig, build_engine  # the engine refuses it too, before any init

    with pytest.raises(ValueError, match="optimizer.name: 'muon' does not run on engine 'deepspeed'"):
        build_engine(
            EngineConfig(name="deepspeed"),
            odd_llama(),
            OptimizerConfig(name="muon"),
            total_steps=1,
            micro_batch_size=1,
        )


def _half(batch, rank, world):
    per = batch["input_ids"].shape[0] // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def _fields(sel) -> dict:
    out = {f: getattr(sel, f).clone() for f in ("alignment", "utility", "gram", "filtered", "indices", "weights")}
    out.update(
        rho=sel.diagnostics["momentum_coef"],
        tau=sel.diagnostics["curvature"],
        covered=list(sel.covered),
        backends=dict(sel.diagnostics["gram_backends"]),
        fallbacks=dict(sel.diagnostics["fallbacks"]),
    )
    return out


def _engine(world: int):
    from optsel.pipeline.engines.shared import EngineConfig, build_engine

    return build_engine(
        EngineConfig(name="fsdp2"),
        odd_llama(),
        OptimizerConfig(**OPTIM),
        total_steps=TRAIN_STEPS + 1,
        micro_batch_size=N_TRAIN // world,
    )


def _body(rank: int, world: int, ckpt: str) -> dict:
    engine = _engine(world)
    model, opt = engine.unwrapped_model, engine.optimizer
    pool, target = (
        _half(make_batch(N_POOL, 8, seed=7), rank, world),
        _half(make_batch(N_TARGET, 8, seed=8), rank, world),
    )
    out = {"before": _fields(FilterThenWeight(model, opt, CFG).select(pool, target))}
    for s in range(TRAIN_STEPS):
        engine.forward_backward(
            _half(make_batch(N_TRAIN, 8, seed=100 + s), rank, world),
            torch.full((N_TRAIN // world,), 1.0 / N_TRAIN),
            loss_scale=float(world),
        )
        engine.step()
    out["after"] = _fields(FilterThenWeight(model, opt, CFG).select(pool, target))
    out["after_muon"] = _fields(FilterThenWeight(model, opt, CFG_MUON).select(pool, target))
    try:  # Muon layers are whole on every rank: block partials summed over ranks would count them R times
        FilterThenWeight(model, opt, dataclasses.replace(CFG, exchange="factors"))
        out["factors_error"] = ""
    except ValueError as err:
        out["factors_error"] = str(err)
    state = {"weights": {}, "muon": {}, "adam": {}}
    for name, p in model.named_parameters():
        state["weights"][name] = p.full_tensor().detach().cpu().clone()
        st = opt.state.get(p, {})
        if "momentum_buffer" in st:
            state["muon"][name] = st["momentum_buffer"].full_tensor().detach().cpu().clone()
        elif "exp_avg" in st:
            state["adam"][name] = (
                int(st["step"]),
                st["exp_avg"].full_tensor().detach().cpu().clone(),
                st["exp_avg_sq"].full_tensor().detach().cpu().clone(),
            )
    out["state"] = state
    out["lr"] = engine.lr()
    # resume: a fresh engine loads the DCP checkpoint; its momentum buffers and its selection are the same
    engine.save_checkpoint(Path(ckpt), {})
    resumed = _engine(world)
    resumed.load_checkpoint(Path(ckpt))
    rmodel, ropt = resumed.unwrapped_model, resumed.optimizer
    out["resumed_buffers_equal"] = all(
        torch.equal(ropt.state[rp]["momentum_buffer"].full_tensor(), opt.state[p]["momentum_buffer"].full_tensor())
        for rp, p in zip(rmodel.parameters(), model.parameters())
        if "momentum_buffer" in opt.state.get(p, {})
    )
    out["resumed"] = _fields(FilterThenWeight(rmodel, ropt, CFG).select(pool, target))
    return out


def _reference(state: dict, dtype: torch.dtype, cfg: FTWConfig = CFG):
    """R = 1: a plain model with the gathered weights, torch.optim.Muon + AdamW with the gathered state."""
    model = odd_llama()
    model.load_state_dict(state["weights"])
    model = model.to(dtype)
    muon_p, adam_p = split_muon_params(model)
    opts = [
        torch.optim.Muon(muon_p, lr=MUON_LR, momentum=0.9, weight_decay=0.0),
        torch.optim.AdamW(adam_p, lr=LR, betas=(0.9, 0.95), weight_decay=0.0),
    ]
    params = dict(model.named_parameters())
    for name, buf in state["muon"].items():
        opts[0].state[params[name]] = {"momentum_buffer": buf.to(dtype).clone()}
    for name, (step, m, v) in state["adam"].items():
        opts[1].state[params[name]] = {
            "step": torch.tensor(float(step)),
            "exp_avg": m.to(dtype).clone(),
            "exp_avg_sq": v.to(dtype).clone(),
        }
    sel = FilterThenWeight(model, opts, cfg).select(make_batch(N_POOL, 8, seed=7), make_batch(N_TARGET, 8, seed=8))
    return _fields(sel), model, opts


def _assert_same(got: dict, ref: dict, where: str, rtol: float = 1e-4) -> None:
    assert got["covered"] == ref["covered"] and got["backends"] == ref["backends"], where
    for f in ("filtered", "indices"):
        assert torch.equal(got[f], ref[f]), (where, f, got[f], ref[f])
    for f in ("alignment", "utility", "gram"):
        torch.testing.assert_close(
            got[f], ref[f], rtol=rtol, atol=rtol * float(ref[f].abs().max()), msg=lambda m, f=f: f"{where} {f}: {m}"
        )
    torch.testing.assert_close(got["weights"], ref["weights"], rtol=rtol, atol=1e-5)


@pytest.mark.distributed
def test_muon_fsdp2_two_ranks_equals_one_equals_bruteforce(tmp_path):
    r0, r1 = run_distributed(_body, 2, args=(str(tmp_path / "ckpt"),), init="fsdp2", timeout_s=300)
    assert r0["resumed_buffers_equal"] and r1["resumed_buffers_equal"]
    _assert_same(r0["resumed"], r0["after"], "resumed vs trained", rtol=1e-12)
    assert r0["lr"] == LR  # the lr metric is AdamW's (optimizer.lr), not Muon's
    for phase in ("before", "after"):
        _assert_same(r1[phase], r0[phase], f"rank 1 vs rank 0 {phase}", rtol=1e-12)
    assert "muon" in r0["after"]["backends"].values()
    assert r0["before"]["fallbacks"].get("muon_degenerate", 0) > 0  # no momentum yet: P = I, counted
    assert "muon_degenerate" not in r0["after"]["fallbacks"]
    ref, _, _ = _reference(r0["state"], torch.float32)
    _assert_same(r0["after"], ref, "R=2 vs R=1")
    ref, _, _ = _reference(r0["state"], torch.float32, CFG_MUON)
    _assert_same(r0["after_muon"], ref, "R=2 vs R=1, geometry muon")
    assert "exchange" in r0["factors_error"] and "exchange" in r1["factors_error"]
    sel, model, opts = _reference(r0["state"], torch.float64)
    b, K = _brute(
        model,
        opts,
        make_batch(N_POOL, 8, seed=7),
        make_batch(N_TARGET, 8, seed=8),
        sel["covered"],
        sel["rho"],
        sel["tau"],
    )
    torch.testing.assert_close(sel["alignment"], b, rtol=1e-5, atol=1e-7 * float(b.abs().max()))
    torch.testing.assert_close(
        sel["gram"], K[sel["filtered"]][:, sel["filtered"]], rtol=1e-5, atol=1e-7 * float(K.abs().max())
    )


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("muon-shards", num_train=1024, num_val=96)


@pytest.mark.slow
def test_muon_run_stop_and_resume_equals_straight_run(data_dir, tmp_path):
    """The trainer with optimizer.name muon and FTW geometry auto under FSDP2 on 2 ranks: S/2 steps, stop,
    resume to S equals the straight S-step run (selected ids, weights, losses) — the soak's exactness rule."""
    from test_checkpoint import STEPS, _assert_same_run, _overrides, _straight_and_split

    overrides = _overrides(
        data_dir, tmp_path, "fsdp2", "ftw", "optimizer.name=muon", "selection.options.ftw.geometry=auto"
    )
    results = run_distributed(_straight_and_split, 2, args=(overrides,), init="fsdp2", timeout_s=600)
    second = results[0]["second"]
    assert second["resumed_from"].endswith(f"step_{STEPS // 2:08d}") and second["num_steps"] == STEPS
    assert results[0]["straight"]["final_eval_loss"] == second["final_eval_loss"]
    _assert_same_run(tmp_path / "straight", tmp_path / "split")
    fallbacks = [
        json.loads(line).get("select/fallback/muon_degenerate")
        for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(f for f in fallbacks)  # the first step: no momentum yet, counted
