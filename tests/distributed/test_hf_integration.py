"""optsel.integrations.hf: FTW inside a real ``transformers.Trainer`` (and TRL's ``SFTTrainer``), on CPU.

A tiny Llama built from a config, a ``datasets.Dataset`` of tokenized rows and a real Trainer run a few
steps; the pools the Trainer delivered are then replayed through optsel's own API (FilterThenWeight /
RandomSelector on a copy of the initial model with a torch AdamW) and must give the same selections, the
same logged losses and the same parameters. Plus: the metrics reach ``state.log_history``, the accelerate
optimizer is unwrapped, and bad arguments are refused with the argument named.
"""

from __future__ import annotations

import copy
import random

import pytest
import torch

datasets = pytest.importorskip("datasets")
transformers = pytest.importorskip("transformers")

from optsel.config_loader import ConfigError  # noqa: E402
from optsel.integrations.hf import OptselTrainer, OptselTrainerMixin, unwrap_optimizer  # noqa: E402
from optsel.losses import per_sample_token_mean_ce  # noqa: E402
from optsel.selection import FilterThenWeight, FTWConfig  # noqa: E402
from optsel.selection.simple import RandomSelector  # noqa: E402

VOCAB, PROMPT, POOL, BUDGET, TARGET_LEN = 96, 3, 8, 3, 10


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="eager",
    )
    return transformers.LlamaForCausalLM(cfg)


def token_rows(n: int, seed: int, length: int | None = None) -> list[dict]:
    """Rows of (input_ids, labels): a 3-token prompt (labels -100) and a 3-11 token answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        ids = [rng.randrange(3, VOCAB) for _ in range(length or rng.randrange(6, 15))]
        rows.append({"input_ids": ids, "labels": [-100] * PROMPT + ids[PROMPT:]})
    return rows


def hf_args(tmp_path, **overrides) -> transformers.TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        learning_rate=5e-3,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        per_device_train_batch_size=2,
        dataloader_num_workers=0,
    )
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


class RecordingMixin:
    """Keeps every pool the Trainer delivered and the selection made from it."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        pool = {key: value.clone() for key, value in inputs.items()}
        loss = super().training_step(model, inputs, num_items_in_batch)
        sel = self.last_selection
        self.records.append((pool, sel.indices.clone(), sel.weights.clone()))
        return loss


class Recording(RecordingMixin, OptselTrainer):
    pass


@pytest.fixture(scope="module")
def data():
    train = datasets.Dataset.from_list(token_rows(40, seed=1))
    target_rows = token_rows(4, seed=2, length=TARGET_LEN)  # one length: the batch needs no padding
    target = {
        "input_ids": torch.tensor([r["input_ids"] for r in target_rows]),
        "labels": torch.tensor([r["labels"] for r in target_rows]),
    }
    target["attention_mask"] = torch.ones_like(target["input_ids"])
    return train, datasets.Dataset.from_list(target_rows), target


def run_trainer(tmp_path, data, selection, trainer_class=Recording, **arg_overrides):
    train, target_ds, _ = data
    model = tiny_llama()
    initial = copy.deepcopy(model.state_dict())
    trainer = trainer_class(
        model=model,
        args=hf_args(tmp_path, **arg_overrides),
        train_dataset=train,
        target_dataset=target_ds,
        selection=selection,
    )
    trainer.records = []
    trainer.train()
    return trainer, initial


def replay(initial, records, selector_of, args, target, single_pass: bool):
    """optsel's own loop on the recorded pools: select, Σ w ℓ gradient, clip, AdamW step."""
    model = tiny_llama()
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        eps=args.adam_epsilon,
        weight_decay=0.0,
    )
    selector = selector_of(model, optimizer)
    losses = []
    for step, (pool, indices, weights) in enumerate(records):
        sel = selector.select(pool, target)
        assert torch.equal(sel.indices, indices), f"step {step + 1}: {sel.indices.tolist()} != {indices.tolist()}"
        torch.testing.assert_close(
            sel.weights, weights, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step + 1}: weights: {m}"
        )
        optimizer.zero_grad()
        w = sel.local_weights.float()
        if single_pass:
            assert sel.pool_pass is not None
            sel.pool_pass.accumulate_into_grads(sel.local_indices, w)
            step_losses = sel.pool_pass.loss[sel.local_indices]
        else:
            chosen = {key: pool[key][sel.local_indices] for key in ("input_ids", "attention_mask", "labels")}
            logits = model(input_ids=chosen["input_ids"], attention_mask=chosen["attention_mask"]).logits
            step_losses = per_sample_token_mean_ce(logits, chosen["labels"]).loss
            (w * step_losses).sum().backward()
        losses.append(float((w.double() * step_losses.detach().double()).sum()))
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        optimizer.step()
    return model, losses


def check_same_training(trainer, initial, selector_of, target, single_pass):
    assert len(trainer.records) == 3
    model, losses = replay(initial, trainer.records, selector_of, trainer.args, target, single_pass)
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            trainer.model.get_parameter(name).detach(),
            p.detach(),
            rtol=1e-4,
            atol=1e-5,
            msg=lambda m: f"parameter {name}: {m}",
        )
    assert not torch.equal(trainer.model.get_parameter("lm_head.weight"), tiny_llama().lm_head.weight)  # it trained
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, abs=2e-4)  # the Trainer logs Σ w_i ℓ_i, rounded to 4 digits


def check_pools(trainer, train):
    """Every pool holds N distinct rows of the train dataset, padded as optsel's batch is."""
    for pool, indices, weights in trainer.records:
        assert pool["input_ids"].shape[0] == POOL and pool["sample_id"].unique().numel() == POOL
        for r, sample in enumerate(pool["sample_id"].tolist()):
            row, n = train[sample], len(train[sample]["input_ids"])
            assert pool["input_ids"][r, :n].tolist() == row["input_ids"]
            assert pool["labels"][r, :n].tolist() == row["labels"] and bool((pool["labels"][r, n:] == -100).all())
            assert pool["attention_mask"][r].sum() == n
        assert 1 <= indices.numel() <= BUDGET and float(weights.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("single_pass", [True, False], ids=["single_pass", "two_pass"])
def test_trainer_selects_and_trains_like_optsels_own_loop(tmp_path, data, single_pass):
    options = {"gram": "exact", "single_pass": single_pass}
    selection = {"pool_size": POOL, "budget": BUDGET, "num_target_samples": 4, "seed": 3, "options": {"ftw": options}}
    trainer, initial = run_trainer(tmp_path, data, selection)
    check_pools(trainer, data[0])
    # (c) the accelerate wrapper is unwrapped: FTW reads torch's AdamW moments
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert type(trainer.selector.optimizer) is torch.optim.AdamW and trainer.selector.optimizer is unwrap_optimizer(
        trainer.optimizer
    )
    assert trainer.selector.config.single_pass is single_pass
    # the selection is FTW's, not uniform: at some step the weights are unequal or fewer than k rows are kept
    assert any(i.numel() < BUDGET or float(w.max() - w.min()) > 1e-3 for _, i, w in trainer.records)
    ftw_config = FTWConfig(budget=BUDGET, **options)
    check_same_training(trainer, initial, lambda m, o: FilterThenWeight(m, o, ftw_config, seed=3), data[2], single_pass)
    # (b) selection metrics reach the Trainer's log history, once per logged step
    logs = [entry for entry in trainer.state.log_history if "select/selected" in entry]
    assert [entry["step"] for entry in logs] == [1, 2, 3]
    for entry, (_, indices, weights) in zip(logs, trainer.records):
        assert entry["select/selected"] == indices.numel() and entry["select/pool_size"] == POOL
        assert entry["select/weight_max"] == pytest.approx(float(weights.max()))
        assert entry["select/single_pass"] == float(single_pass)
        assert entry["time/phase/select"] > 0 and entry["time/phase/capture"] > 0
        assert entry["time/overhead_ratio"] > 1.0 and "select/filtered" in entry


def test_random_selector_and_metric_means_over_logging_steps(tmp_path, data):
    selection = {"method": "random", "pool_size": POOL, "budget": BUDGET, "seed": 5, "num_target_samples": 4}
    trainer, initial = run_trainer(tmp_path, data, selection, logging_steps=3)
    check_pools(trainer, data[0])
    check_same_training_random = lambda: replay(
        initial,
        trainer.records,  # noqa: E731
        lambda m, o: RandomSelector(budget=BUDGET, seed=5),
        trainer.args,
        None,
        single_pass=False,
    )
    model, _ = check_same_training_random()
    for name, p in model.named_parameters():
        torch.testing.assert_close(trainer.model.get_parameter(name).detach(), p.detach(), rtol=1e-4, atol=1e-5)
    logs = [entry for entry in trainer.state.log_history if "select/selected" in entry]
    assert len(logs) == 1 and logs[0]["step"] == 3  # one log every 3 steps: the mean of the 3 steps
    assert logs[0]["select/selected"] == BUDGET and logs[0]["select/weight_min"] == pytest.approx(1 / BUDGET)
    assert logs[0]["select/single_pass"] == 0.0


def test_selector_sees_the_real_optimizer_class(tmp_path, data):
    """geometry='adam' with a non-Adam optimizer names torch's class, not accelerate's wrapper."""
    selection = {"pool_size": POOL, "budget": BUDGET, "num_target_samples": 4}
    with pytest.raises(TypeError, match=r"torch\.optim\.sgd\.SGD is not supported by geometry='adam'"):
        run_trainer(tmp_path, data, selection, optim="sgd")
    selection["options"] = {"ftw": {"geometry": "sgd"}}
    trainer, _ = run_trainer(tmp_path, data, selection, optim="sgd", max_steps=1)
    assert type(trainer.selector.optimizer) is torch.optim.SGD and len(trainer.records) == 1


def test_resume_restores_the_selector_state(tmp_path, data):
    """A run resumed from the Trainer's checkpoint selects what the uninterrupted run selects: the selector's
    state (here FTW's step counter: the first 2 steps are random warm-up) travels in the checkpoint folder."""
    selection = {
        "pool_size": POOL,
        "budget": BUDGET,
        "num_target_samples": 4,
        "seed": 3,
        "options": {"ftw": {"gram": "exact", "warmup_steps": 2}},
    }
    full, _ = run_trainer(tmp_path / "full", data, selection)
    first, _ = run_trainer(tmp_path / "part", data, selection, max_steps=2, save_strategy="steps", save_steps=2)
    state_file = tmp_path / "part" / "checkpoint-2" / "optsel_selector_rank00000.pt"
    assert state_file.is_file() and torch.load(state_file, weights_only=True)["step"] == 2

    def resumed():
        trainer = Recording(
            model=tiny_llama(seed=9),
            args=hf_args(tmp_path / "part"),
            train_dataset=data[0],
            target_dataset=data[1],
            selection=selection,
        )
        trainer.records = []
        trainer.train(resume_from_checkpoint=True)
        return trainer

    second = resumed()
    assert [i.tolist() for _, i, _ in first.records + second.records] == [i.tolist() for _, i, _ in full.records]
    torch.testing.assert_close(second.records[0][2], full.records[2][2], rtol=1e-4, atol=1e-6)
    assert "select/filtered" in second.state.log_history[-2] and second.state.global_step == 3  # FTW, not warm-up
    for name, p in second.model.named_parameters():
        torch.testing.assert_close(p, full.model.get_parameter(name), rtol=1e-4, atol=1e-5)
    state_file.unlink()  # without it the selector starts fresh: step 3 is a warm-up (random) step again
    fresh = resumed()
    assert "select/filtered" not in fresh.state.log_history[-2]


def make(tmp_path, data, selection=None, target="given", train=None, **arg_overrides):
    train_ds, target_ds, _ = data
    selection = selection if selection is not None else {"pool_size": POOL, "budget": BUDGET, "num_target_samples": 4}
    return OptselTrainer(
        model=tiny_llama(),
        args=hf_args(tmp_path, **arg_overrides),
        train_dataset=train if train is not None else train_ds,
        target_dataset=target_ds if target == "given" else target,
        selection=selection,
    )


@pytest.mark.parametrize(
    "overrides,match",
    [
        (dict(gradient_accumulation_steps=2), r"TrainingArguments\.gradient_accumulation_steps=2: must be 1"),
        (dict(activation_checkpointing=True), r"TrainingArguments\.activation_checkpointing=True: optsel's capture"),
    ],
    ids=["accumulation", "checkpointing"],
)
def test_bad_training_arguments_are_refused(tmp_path, data, overrides, match):
    with pytest.raises(ValueError, match=match):
        make(tmp_path, data, **overrides)


@pytest.mark.parametrize(
    "selection,match",
    [
        ({"pool_size": POOL, "budget": BUDGET, "pool_sz": 4}, r"'selection\.pool_sz': unknown key"),
        ({"pool_size": POOL, "budget": POOL + 1}, r"'selection\.budget': must be in \[1, pool_size=8\]"),
        (
            {"pool_size": POOL, "budget": BUDGET, "options": {"ftw": {"gramm": "exact"}}},
            r"'selection\.options\.ftw\.gramm': unknown key",
        ),
        (
            {"pool_size": POOL, "budget": BUDGET, "options": {"ftw": {"budget": 2}}},
            r"'selection\.options\.ftw\.budget': set the budget once",
        ),
        ({"method": "nosuch", "pool_size": POOL, "budget": BUDGET}, r"unknown selector 'nosuch'"),
    ],
    ids=["unknown_key", "budget", "ftw_option", "ftw_budget", "method"],
)
def test_bad_selection_config_is_refused(tmp_path, data, selection, match):
    with pytest.raises(ConfigError, match=match):
        make(tmp_path, data, selection=selection)
    with pytest.raises(TypeError, match="selection: expected optsel's SelectionConfig"):
        make(tmp_path, data, selection=[("pool_size", 8)])


def test_bad_datasets_are_refused(tmp_path, data):
    train, target_ds, _ = data
    with pytest.raises(ValueError, match=r"target_dataset: selection\.method 'ftw' needs a target"):
        make(tmp_path, data, target=None)
    with pytest.raises(ValueError, match=r"target_dataset: 4 rows, fewer than selection\.num_target_samples=16"):
        make(tmp_path, data, selection={"pool_size": POOL, "budget": BUDGET})
    with pytest.raises(ValueError, match=r"train_dataset: 5 rows, fewer than selection\.pool_size=8"):
        make(tmp_path, data, train=train.select(range(5)))
    untokenized = datasets.Dataset.from_list([{"text": "hello"}] * 4)
    with pytest.raises(ValueError, match=r"target_dataset row 0: needs tokenized 'input_ids'.*\['text'\]"):
        make(tmp_path, data, target=untokenized)
    masked = datasets.Dataset.from_list([{"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}] * 4)
    with pytest.raises(ValueError, match="target_dataset: none of its first 4 rows .* has a loss token"):
        make(tmp_path, data, target=masked)
    rows = token_rows(8, seed=3)
    rows[5]["labels"] = rows[5]["labels"][:-1]
    trainer = make(tmp_path, data, train=datasets.Dataset.from_list(rows))
    with pytest.raises(ValueError, match=r"train_dataset row 5: 'labels' has \d+ entries, 'input_ids' \d+"):
        trainer.train()
    # the target may come from eval_dataset instead; a random selector needs none
    OptselTrainer(
        model=tiny_llama(),
        args=hf_args(tmp_path),
        train_dataset=train,
        eval_dataset=target_ds,
        selection={"pool_size": POOL, "budget": BUDGET, "num_target_samples": 4},
    )
    assert (
        make(
            tmp_path, data, target=None, selection={"method": "random", "pool_size": POOL, "budget": BUDGET}
        )._optsel_target
        is None
    )


# -- TRL ---------------------------------------------------------------------------------------------
def local_tokenizer():
    """A word-level tokenizer built here (no hub): digits, a few words and the special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<s>", "</s>", "<unk>", "question", "answer", "plus", "is"] + [str(i) for i in range(20)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    from optsel.integrations.hf import OptselSFTTrainer

    assert issubclass(OptselSFTTrainer, OptselTrainerMixin) and issubclass(OptselSFTTrainer, trl.SFTTrainer)
    rng = random.Random(0)

    def records(n):
        out = []
        for _ in range(n):
            a, b = rng.randrange(10), rng.randrange(10)
            out.append({"prompt": f"question {a} plus {b}", "completion": f" answer is {a + b}"})
        return out

    tok = local_tokenizer()
    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        logging_steps=1,
        learning_rate=5e-3,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_length=32,
        per_device_train_batch_size=2,
    )
    model = tiny_llama()
    initial = copy.deepcopy(model.state_dict())
    cls = type("RecordingSFT", (RecordingMixin, OptselSFTTrainer), {})
    trainer = cls(
        model=model,
        args=args,
        train_dataset=datasets.Dataset.from_list(records(24)),
        eval_dataset=datasets.Dataset.from_list(records(4)),
        processing_class=tok,
        selection={"pool_size": POOL, "budget": BUDGET, "num_target_samples": 4, "options": {"ftw": {"gram": "exact"}}},
    )
    trainer.records = []
    trainer.train()
    assert len(trainer.records) == 2 and trainer._optsel_single_pass
    for pool, _, _ in trainer.records:  # TRL tokenized prompt/completion rows: loss on the completion only
        prompt_len = len(tok("question 1 plus 2")["input_ids"])
        assert bool((pool["labels"][:, :prompt_len] == -100).all()) and bool((pool["labels"] != -100).any())
    target = trainer._optsel_target
    ftw_config = FTWConfig(budget=BUDGET, gram="exact")
    model2, losses = replay(
        initial,
        trainer.records,
        lambda m, o: FilterThenWeight(m, o, ftw_config, seed=0),
        trainer.args,
        target,
        single_pass=True,
    )
    for name, p in model2.named_parameters():
        torch.testing.assert_close(trainer.model.get_parameter(name).detach(), p.detach(), rtol=1e-4, atol=1e-5)
    assert [e["step"] for e in trainer.state.log_history if "select/selected" in e] == [1, 2]
    packed = trl.SFTConfig(
        output_dir=str(tmp_path),
        packing=True,
        max_length=32,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
    )
    with pytest.raises(ValueError, match=r"SFTConfig\.packing=True: optsel selects and weights whole samples"):
        OptselSFTTrainer(
            model=tiny_llama(),
            args=packed,
            train_dataset=datasets.Dataset.from_list(records(24)),
            eval_dataset=datasets.Dataset.from_list(records(4)),
            processing_class=tok,
            selection={"pool_size": POOL, "budget": BUDGET, "num_target_samples": 4},
        )


# -- two data-parallel ranks (real gloo, the Trainer's own DDP) ----------------------------------------
def _ddp_body(rank: int, world_size: int, out_dir: str) -> dict:
    train = datasets.Dataset.from_list(token_rows(40, seed=1))
    target_ds = datasets.Dataset.from_list(token_rows(4, seed=2, length=TARGET_LEN))
    selection = {
        "pool_size": POOL,
        "budget": BUDGET,
        "num_target_samples": 4,
        "seed": 3,
        "options": {"ftw": {"gram": "exact"}},
    }
    trainer = Recording(
        model=tiny_llama(),
        args=hf_args(out_dir, ddp_backend="gloo"),
        train_dataset=train,
        target_dataset=target_ds,
        selection=selection,
    )
    trainer.records = []
    trainer.train()
    return {
        "records": trainer.records,
        "single_pass": trainer._optsel_single_pass,
        "world": trainer.args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "log": trainer.state.log_history,
        "params": {
            n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
        },
    }


@pytest.mark.distributed
def test_two_ranks_select_and_train_like_one_process_on_the_global_pool(tmp_path, data):
    """Two gloo ranks under the Trainer's DDP: pools of N/2 per rank, the same global selection on both,
    two-pass training scaled by R; optsel's own loop on the rank-major global pools gives the same."""
    from optsel.selection.capture import stack_batches

    from support.dist import run_distributed

    results = run_distributed(_ddp_body, world_size=2, args=(str(tmp_path),), init=None, timeout_s=240)
    r0, r1 = results
    assert r0["world"] == 2 and "MULTI_CPU" in r0["distributed_type"] and not r0["single_pass"]
    for name, p in r0["params"].items():  # DDP kept the replicas equal
        torch.testing.assert_close(p, r1["params"][name], rtol=0, atol=0)
    records = []
    for (pool0, idx0, w0), (pool1, idx1, w1) in zip(r0["records"], r1["records"]):
        assert pool0["input_ids"].shape[0] == pool1["input_ids"].shape[0] == POOL // 2
        assert not set(pool0["sample_id"].tolist()) & set(pool1["sample_id"].tolist())  # distinct rows per rank
        assert torch.equal(idx0, idx1) and torch.equal(w0, w1)  # one global selection
        records.append((stack_batches(pool0, pool1), idx0, w0))
    assert len(records) == 3
    initial = tiny_llama().state_dict()
    ftw_config = FTWConfig(budget=BUDGET, gram="exact")
    model, losses = replay(
        initial,
        records,
        lambda m, o: FilterThenWeight(m, o, ftw_config, seed=3),
        hf_args(tmp_path),
        data[2],
        single_pass=False,
    )
    for name, p in model.named_parameters():
        torch.testing.assert_close(
            r0["params"][name], p.detach(), rtol=1e-4, atol=1e-5, msg=lambda m: f"parameter {name}: {m}"
        )
    logged = [entry["loss"] for entry in r0["log"] if "loss" in entry]
    assert logged == pytest.approx(losses, abs=2e-4)  # the global Σ w_i ℓ_i (each rank returns R · its part)
