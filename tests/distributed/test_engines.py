"""Engines (DeepSpeed ZeRO-3, FSDP2), the shared objective / schedule pieces, and the model builder.

The distributed tests spawn 2 real gloo ranks once per engine and check, on a tiny Llama that
really shards: per-sample losses, skip_step, the weighted cross-rank gradient against the
single-process gradient of Σ_i w_i ℓ_i, the grad norm, training on a memorization task, generate.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from optsel import distributed
from optsel.losses import per_sample_token_mean_ce
from optsel.pipeline.engines import shared
from optsel.pipeline.engines.deepspeed_engine import fill_ds_config, load_ds_config
from optsel.pipeline.engines.shared import EngineConfig, OptimizerConfig, build_engine
from optsel.pipeline.train.model import LoraSettings, ModelConfig, build_model
from optsel.selection.capture import capture_factors, find_covered_layers
from optsel.selection.model_view import model_view_for
from optsel.selection.single_pass import PoolPass, single_pass_leaves

from support.common import REPO
from support.dist import run_distributed

VOCAB, SEQ, N_GLOBAL = 32, 12, 8
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# global weights of the weighted step: rank 0 owns samples 0-3, rank 1 owns 4-7
ZERO3_JSON = REPO / "configs" / "deepspeed" / "zero3.json"
STEP_WEIGHTS = torch.tensor([0.3, 0.0, 0.1, 0.2, 0.0, 0.05, 0.25, 0.1])
RANK0_ONLY_WEIGHTS = torch.tensor([0.5, 0.2, 0.0, 0.3, 0.0, 0.0, 0.0, 0.0])


def toy_batch() -> dict[str, torch.Tensor]:
    """8 fixed random sequences [8, 12]; no loss on the 2 prompt tokens; sample 3 is right-padded
    (length 8) and sample 5 has no labels at all (loss 0, flagged)."""
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, VOCAB, (N_GLOBAL, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    ids[3, 8:], mask[3, 8:] = 0, 0
    labels = ids.clone()
    labels[:, :2] = -100
    labels[mask == 0] = -100
    labels[5] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def local_part(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    per = N_GLOBAL // world
    return {k: v[rank * per : (rank + 1) * per] for k, v in batch.items()}


def tiny_model(**overrides):
    return build_model(ModelConfig(**{**TINY, **overrides}), vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2)


def reference_step(batch, weights) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Single process, plain model: per-sample losses [8] and grads of Σ_i w_i ℓ_i by name."""
    model = tiny_model()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    losses = per_sample_token_mean_ce(out.logits, batch["labels"]).loss
    shared.weighted_objective(losses, weights, 1.0).backward()
    return losses.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


# -- the distributed body, shared by both engines ---------------------------------------------------


def _full_grads(engine) -> dict[str, torch.Tensor]:
    """Every parameter's full gradient (collective: all ranks call it)."""
    out = {}
    for name, p in engine.unwrapped_model.named_parameters():
        if engine.name == "deepspeed":
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(p)
        else:
            grad = p.grad.full_tensor() if p.grad is not None else None
        out[name] = grad.detach().float().cpu().clone() if grad is not None else None
    return out


def _shard_sizes(engine) -> dict[str, int]:
    """Elements of each parameter that this rank holds (proves the model is really sharded)."""
    sizes = {}
    for name, p in engine.unwrapped_model.named_parameters():
        sizes[name] = int(p.ds_tensor.numel()) if hasattr(p, "ds_tensor") else int(p.to_local().numel())
    return sizes


def _engine_body(rank: int, world: int, engine_name: str, ds_config_path: str, num_train_steps: int) -> dict:
    batch = toy_batch()
    local = local_part(batch, rank, world)
    weights = local_part({"w": STEP_WEIGHTS}, rank, world)["w"]
    engine = build_engine(
        EngineConfig(name=engine_name, deepspeed_config=ds_config_path),
        tiny_model(),
        OptimizerConfig(lr=1e-2, schedule="constant", grad_clip=1.0),
        total_steps=num_train_steps + 1,
        micro_batch_size=N_GLOBAL // world,
    )
    result: dict = {"shard_sizes": _shard_sizes(engine), "lr": engine.lr()}

    # 1. rank 1 holds no selected sample and runs one zero-weight sample (as the trainer does); the
    #    gradient is then dropped with skip_step: the weighted step below must not see it
    if rank == 0:
        engine.forward_backward(local, RANK0_ONLY_WEIGHTS[:4], loss_scale=float(world))
    else:
        engine.forward_backward({k: v[:1] for k, v in local.items()}, torch.zeros(1), loss_scale=float(world))
    result["rank0_only_grads"] = _full_grads(engine)
    engine.skip_step()

    # 1b. the single pass (selection/single_pass.py): the weighted gradient from the capture's own
    #     forward/backward over the local pool, with no second forward; checked below against the
    #     single-process gradient (the two-pass step of 2. is checked against the same reference)
    leaves, problem = single_pass_leaves(engine.unwrapped_model)
    assert not problem, problem
    kept = PoolPass()
    capture_factors(
        engine.unwrapped_model, local, find_covered_layers(engine.unwrapped_model).layers, None, kept, leaves
    )
    model_view_for(engine.unwrapped_model, engine.optimizer).after_selection()  # what FTW's select does
    result["single_pass_losses"] = engine.backward_from_pass(kept, torch.arange(len(weights)), weights, float(world))
    result["single_pass_grads"] = _full_grads(engine)
    engine.skip_step()

    # 2. the weighted step: per-sample losses, full gradient, pre-clip grad norm
    result["losses"] = engine.forward_backward(local, weights, loss_scale=float(world))
    result["no_grad_losses"] = engine.per_sample_loss(local)
    result["grads"] = _full_grads(engine)
    result["grad_norm"] = engine.step()

    # 3. memorize the 8 sequences (a rank-local weight 0 sample still runs forward/backward)
    uniform = torch.full((len(weights),), 1.0 / N_GLOBAL)
    train_losses = []
    for _ in range(num_train_steps):
        losses = engine.forward_backward(local, uniform, loss_scale=float(world))
        step_loss = torch.tensor([float((uniform * losses).sum())])
        train_losses.append(float(distributed.all_reduce_sum(step_loss)))
        engine.step()
    result["train_losses"] = train_losses

    # 4. greedy generation on the same (mixed left/right padded) prompts on every rank
    prompts = batch["input_ids"][:3, :5].clone()
    mask = torch.ones_like(prompts)
    mask[1, 3:] = 0  # right padded
    mask[2, :2] = 0  # left padded
    generated = engine.generate(prompts, mask, max_new_tokens=4)
    # teacher-forced check of the cached decoding: argmax of a full forward over prompt + generated
    full = torch.cat([prompts[0:1], generated[0:1]], dim=1)
    with torch.no_grad():
        logits = engine.module(input_ids=full.to(engine.device), use_cache=False).logits.float().cpu()
    result["generated"] = generated
    result["teacher_forced"] = logits[0, 4:-1].argmax(-1)
    engine.close()
    return result


def _check_engine_results(results: list[dict]) -> None:
    batch = toy_batch()
    ref_losses, ref_grads = reference_step(batch, STEP_WEIGHTS)
    r0, r1 = results

    # sharded for real: each rank holds a part of every weight matrix
    for name, size in r0["shard_sizes"].items():
        full = ref_grads[name].numel()
        assert size < full and size + r1["shard_sizes"][name] >= full, (name, size, full)

    # per-sample losses (and the flagged empty sample 5 has loss 0)
    losses = torch.cat([r0["losses"], r1["losses"]])
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        torch.cat([r0["no_grad_losses"], r1["no_grad_losses"]]), ref_losses, atol=1e-5, rtol=1e-5
    )
    assert losses[5] == 0.0
    weighted = float((STEP_WEIGHTS * losses).sum())
    hand = sum(float(w) * float(l) for w, l in zip(STEP_WEIGHTS, ref_losses))
    assert math.isclose(weighted, hand, rel_tol=1e-5)

    # the weighted 2-rank gradient (loss_scale = world) is the single-process gradient of Σ w_i ℓ_i
    for name, ref in ref_grads.items():
        for r in results:
            torch.testing.assert_close(
                r["grads"][name], ref, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
            )
    # the single pass gives the same gradient and losses (float tolerance: HF's RMSNorm rounds in fp32)
    torch.testing.assert_close(
        torch.cat([r0["single_pass_losses"], r1["single_pass_losses"]]), ref_losses, atol=1e-5, rtol=1e-5
    )
    for name, ref in ref_grads.items():
        for r in results:
            torch.testing.assert_close(
                r["single_pass_grads"][name],
                ref,
                atol=1e-6,
                rtol=1e-4,
                msg=lambda m, name=name: f"single pass {name}: {m}",
            )
    _, ref_rank0_only = reference_step(batch, RANK0_ONLY_WEIGHTS)
    for name, ref in ref_rank0_only.items():
        torch.testing.assert_close(
            r1["rank0_only_grads"][name], ref, atol=1e-6, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )
    ref_norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in ref_grads.values()))
    assert math.isclose(r0["grad_norm"], ref_norm, rel_tol=1e-4), (r0["grad_norm"], ref_norm)
    assert r0["lr"] == pytest.approx(1e-2)

    # training memorizes: the loss drops a lot and both ranks agree on it
    first, last = r0["train_losses"][0], r0["train_losses"][-1]
    assert r0["train_losses"] == pytest.approx(r1["train_losses"])
    assert last < 0.6 * first, r0["train_losses"]

    # generation: right shape, identical on both ranks, equal to teacher-forced argmax
    assert r0["generated"].shape == (3, 4) and r0["generated"].dtype == torch.long
    assert torch.equal(r0["generated"], r1["generated"])
    assert torch.equal(r0["generated"][0], r0["teacher_forced"])


@pytest.mark.distributed
def test_deepspeed_zero3_two_ranks(tmp_path):
    raw = load_ds_config(ZERO3_JSON)
    raw["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # make the tiny model shard
    path = tmp_path / "zero3_test.json"
    path.write_text(json.dumps(raw))
    results = run_distributed(_engine_body, 2, args=("deepspeed", str(path), 20), init="deepspeed", timeout_s=140)
    _check_engine_results(results)


@pytest.mark.distributed
def test_fsdp2_two_ranks():
    results = run_distributed(_engine_body, 2, args=("fsdp2", "", 20), init="fsdp2", timeout_s=90)
    _check_engine_results(results)


def _fsdp2_world_of_one_lora(rank: int, world: int) -> dict:
    model = build_model(
        ModelConfig(**TINY, lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"])),
        vocab_size=VOCAB,
        pad_id=0,
        bos_id=1,
        eos_id=2,
    )
    engine = build_engine(
        EngineConfig(name="fsdp2"),
        model,
        OptimizerConfig(lr=1e-2, schedule="constant"),
        total_steps=5,
        micro_batch_size=N_GLOBAL,
    )
    batch = toy_batch()
    losses = [float(engine.forward_backward(batch, torch.full((N_GLOBAL,), 1 / N_GLOBAL), 1.0).sum())]
    frozen_before = engine.unwrapped_model.base_model.model.model.layers[0].mlp.up_proj.weight.full_tensor().clone()
    for _ in range(4):
        engine.step()
        losses.append(float(engine.forward_backward(batch, torch.full((N_GLOBAL,), 1 / N_GLOBAL), 1.0).sum()))
    frozen_after = engine.unwrapped_model.base_model.model.model.layers[0].mlp.up_proj.weight.full_tensor()
    trainable = sorted(n for n, p in engine.unwrapped_model.named_parameters() if p.requires_grad)
    return {
        "losses": losses,
        "frozen_unchanged": bool(torch.equal(frozen_before, frozen_after)),
        "trainable": trainable,
        "world": torch.distributed.get_world_size(),
    }


@pytest.mark.distributed
def test_fsdp2_world_of_one_with_lora():
    (result,) = run_distributed(_fsdp2_world_of_one_lora, 1, init="fsdp2", timeout_s=60)
    assert result["world"] == 1
    assert result["trainable"] and all("lora_" in n for n in result["trainable"])
    assert result["frozen_unchanged"]
    assert result["losses"][-1] < result["losses"][0], result["losses"]


def _rank1_raises(rank: int, world: int) -> int:
    if rank == 1:
        raise KeyError("boom on rank 1")
    torch.distributed.barrier()  # would hang without the helper's early exit
    return rank


def _rank1_hangs(rank: int, world: int) -> int:
    if rank == 1:
        import time

        time.sleep(600)
    return rank


@pytest.mark.distributed
def test_dist_utils_reports_errors_and_timeouts():
    from support.dist import DistributedTestError

    assert run_distributed(_rank1_hangs, 1, init=None) == [0]
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 raised.*KeyError: 'boom on rank 1'"):
        run_distributed(_rank1_raises, 2, timeout_s=60)
    with pytest.raises(DistributedTestError, match="timed out after 10 s"):
        run_distributed(_rank1_hangs, 2, init=None, timeout_s=10)


# -- single-process pieces --------------------------------------------------------------------------


def test_per_sample_loss_matches_token_loop_and_flags_empty():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 6, -100, -100], [-100] * 5])
    out = per_sample_token_mean_ce(logits, labels)
    for i in range(2):
        terms = [-torch.log_softmax(logits[i, t - 1], -1)[labels[i, t]] for t in range(1, 5) if labels[i, t] != -100]
        assert float(out.loss[i]) == pytest.approx(float(sum(terms) / len(terms)), rel=1e-6)
    assert out.num_tokens.tolist() == [4, 1, 0] and out.empty.tolist() == [False, False, True]
    assert float(out.loss[2]) == 0.0
    w = torch.tensor([0.25, 0.75, 0.0])
    obj = shared.weighted_objective(out.loss, w, loss_scale=2.0)
    assert float(obj) == pytest.approx(2.0 * (0.25 * float(out.loss[0]) + 0.75 * float(out.loss[1])), rel=1e-6)
    with pytest.raises(ValueError, match="sample_weights"):
        shared.check_sample_weights(torch.tensor([0.5, -0.1, 0.0]), 3)
    with pytest.raises(ValueError, match="sample_weights"):
        shared.check_sample_weights(torch.tensor([0.5, 0.5]), 3)


def test_lr_schedules():
    def factors(**kw):
        opt = OptimizerConfig(lr=1.0, **kw)
        sched = shared.lr_scheduler_factory(opt, total_steps=10)(
            torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
        )
        out = []
        for _ in range(11):
            out.append(sched.get_last_lr()[0])
            sched.optimizer.step()
            sched.step()
        return out

    assert factors(schedule="constant", warmup_steps=2)[:4] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    lin = factors(schedule="linear", warmup_steps=0, min_lr_ratio=0.0)
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5) and lin[10] == pytest.approx(0.0)
    cos = factors(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert cos[:2] == pytest.approx([0.5, 1.0]) and cos[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert cos[10] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="min_lr_ratio"):
        shared.lr_scheduler_factory(OptimizerConfig(min_lr_ratio=1.5), total_steps=10)


def test_precision_choice():
    assert shared.resolve_precision("auto", torch.device("cpu")) == torch.float32
    assert shared.resolve_precision("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert shared.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_greedy_generate_is_padding_invariant_and_matches_full_forward():
    model = tiny_model().eval()
    prompt = toy_batch()["input_ids"][0, :4]
    right = torch.stack([torch.cat([prompt, torch.zeros(2, dtype=torch.long)]), torch.arange(3, 9)])
    right_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6])
    left = torch.stack([torch.cat([torch.zeros(2, dtype=torch.long), prompt]), torch.arange(3, 9)])
    left_mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    cpu = torch.device("cpu")
    a = shared.greedy_generate(model, right, right_mask, 5, cpu)
    b = shared.greedy_generate(model, left, left_mask, 5, cpu)
    assert a.shape == (2, 5) and torch.equal(a, b)
    seq = prompt[None]
    for _ in range(5):  # reference: no cache, unpadded
        seq = torch.cat([seq, model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(a[0], seq[0, 4:])
    with pytest.raises(ValueError, match="no tokens"):
        shared.greedy_generate(model, right, torch.zeros_like(right_mask), 2, cpu)


def test_model_builder_config_seed_local_and_lora(tmp_path):
    a, b = tiny_model(init_seed=3), tiny_model(init_seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.lm_head.weight, tiny_model(init_seed=4).lm_head.weight)
    assert a.config.vocab_size == VOCAB and a.config.num_key_value_heads == 2 and a.config.pad_token_id == 0

    a.save_pretrained(tmp_path / "tiny")
    loaded = build_model(
        ModelConfig(source="local", path=str(tmp_path / "tiny")), vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2
    )
    ids = toy_batch()["input_ids"][:2]
    torch.testing.assert_close(loaded(input_ids=ids).logits, a(input_ids=ids).logits)
    assert loaded.dtype == torch.float32
    with pytest.raises(ValueError, match="embedding rows"):
        build_model(
            ModelConfig(source="local", path=str(tmp_path / "tiny")), vocab_size=VOCAB + 1, pad_id=0, bos_id=1, eos_id=2
        )
    with pytest.raises(FileNotFoundError, match="model.path"):
        build_model(
            ModelConfig(source="local", path=str(tmp_path / "missing")), vocab_size=VOCAB, pad_id=0, bos_id=1, eos_id=2
        )

    lora = tiny_model(lora=LoraSettings(r=2, target_modules=["q_proj"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and "q_proj" in n for n in trainable)


def test_model_config_validation():
    with pytest.raises(ValueError, match="^path:"):
        ModelConfig(source="local")
    with pytest.raises(ValueError, match="^num_key_value_heads:"):
        ModelConfig(num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match="^r:"):
        LoraSettings(r=0)


def test_ds_config_fill_and_strictness():
    raw = load_ds_config(ZERO3_JSON)
    opt = OptimizerConfig(grad_clip=0.5)
    cfg = fill_ds_config(
        raw, source="zero3.json", micro_batch_size=4, world_size=2, optim=opt, dtype=torch.bfloat16, hidden_size=64
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["train_batch_size"] == 8
    assert cfg["gradient_accumulation_steps"] == 1 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    assert cfg["zero_optimization"]["stage3_param_persistence_threshold"] == 640
    assert "optimizer" not in cfg and raw["zero_optimization"]["reduce_bucket_size"] == "auto"  # raw untouched
    fp32 = fill_ds_config(
        raw, source="x", micro_batch_size=1, world_size=1, optim=opt, dtype=torch.float32, hidden_size=64
    )
    assert fp32["bf16"]["enabled"] is False
    for bad, match in [
        ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu"),
        ({"optimizer": {"type": "Adam"}}, "'optimizer'"),
        ({"fp16": {"enabled": True}}, "fp16.enabled"),
        ({"zero_optimization": {"stage": 2}}, "stage=2"),
        ({"zero_optimization": {"stage": 3, "foo": "auto"}}, "zero_optimization.foo"),
    ]:
        with pytest.raises(ValueError, match=match):
            fill_ds_config(
                {**raw, **bad},
                source="bad.json",
                micro_batch_size=1,
                world_size=1,
                optim=opt,
                dtype=torch.float32,
                hidden_size=64,
            )
    with pytest.raises(FileNotFoundError, match="deepspeed_config"):
        load_ds_config(ZERO3_JSON.with_name("nope.json"))
