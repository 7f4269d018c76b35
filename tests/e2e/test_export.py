"""``optsel export``: a checkpoint of either engine back to a Hugging Face ``save_pretrained`` folder.

One short 2-rank gloo run per engine (in-process Trainers, shared by the module): FSDP2 untied, and
DeepSpeed ZeRO-3 with tied embeddings plus a LoRA run. Each run's reference logits come from the
live, still-sharded trained model, computed by the engine itself inside the training processes right
after the final checkpoint was saved (the weights do not change after that save). That path shares
nothing with the export's reading of the checkpoint, so a wrong key mapping, a wrong or missing shard
or a lost tie shows up as a logits mismatch. The exports are loaded only through transformers / peft
(``AutoModelForCausalLM``, ``AutoTokenizer``, ``PeftModel``). Tampered, signed, unsafe and missing
checkpoints are refused; ``--out`` is never overwritten.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from support.common import REPO
from support.dist import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # the module's runs: 2 gloo ranks per engine

STEPS = 2
PROBE_TEXT = ["12+34=46\n7+8=", "distractor: 99-1"]
KEY_VARS = ("OPTSEL_CHECKPOINT_KEY", "OPTSEL_CHECKPOINT_KEY_FILE")


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("export-shards", num_train=256, num_val=64)


def _overrides(data_dir: Path, out: Path, engine: str, name: str, *extra: str) -> list[str]:
    return [
        f"data.local={data_dir}",
        f"output_dir={out}",
        f"run_name={name}",
        f"engine.name={engine}",
        "training.progress_bar=false",
        "training.num_eval_samples=8",
        "monitoring.enabled=false",
        "training.eval_every=0",
        "selection.method=random",
        f"training.num_steps={STEPS}",
        "selection.pool_size=8",
        "selection.budget=4",
        "selection.num_target_samples=4",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=2",
        "optimizer.lr=0.02",
        "optimizer.warmup_steps=1",
        "training.callbacks.plot=false",
        *extra,
    ]


def _probe(data_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    from optsel.pipeline.data.tokenizer import load_tokenizer

    batch = load_tokenizer(data_dir / "tokenizer")(PROBE_TEXT, padding=True, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"]


def _train_and_probe(
    rank: int, world: int, runs: list[tuple[str, list[str]]], ids: torch.Tensor, mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Train each run, then the engine's own forward of the probe on the sharded model (collective)."""
    from optsel.pipeline.train.run_config import load_run_config
    from optsel.pipeline.train.trainer import Trainer

    logits = {}
    for name, overrides in runs:
        trainer = Trainer(load_run_config(REPO / "configs/demo.yaml", overrides))
        try:
            summary = trainer.train()
            assert summary["num_steps"] == STEPS
            trainer.engine.module.eval()
            with torch.no_grad():
                logits[name] = trainer.engine.module(input_ids=ids, attention_mask=mask).logits.float().cpu()
        finally:
            trainer.close()
    return logits


def _local_model(folder: Path) -> Path:
    """A tiny Llama saved with save_pretrained, sized for the byte tokenizer (a user's own base model)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(5)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=259,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )
    ).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """{name: (run folder, live logits [2, T, vocab])}: fsdp2 (untied), fsdp2 LoRA on a local model folder,
    deepspeed (tied), deepspeed LoRA on a model built from config."""
    ids, mask = _probe(data_dir)
    out = tmp_path_factory.mktemp("export-runs")
    base = _local_model(out / "my-base")
    found: dict[str, tuple[Path, torch.Tensor]] = {}
    plan = {
        "fsdp2": [
            ("fsdp2", _overrides(data_dir, out, "fsdp2", "fsdp2")),
            (
                "local_lora",
                _overrides(
                    data_dir, out, "fsdp2", "local_lora", "model.source=local", f"model.path={base}", "model.lora.r=2"
                ),
            ),
        ],
        "deepspeed": [
            ("deepspeed", _overrides(data_dir, out, "deepspeed", "deepspeed", "model.tie_word_embeddings=true")),
            (
                "lora",
                _overrides(
                    data_dir,
                    out,
                    "deepspeed",
                    "lora",
                    "model.lora.r=4",
                    "model.lora.target_modules=[q_proj,v_proj,down_proj]",
                ),
            ),
        ],
    }
    for engine, jobs in plan.items():
        logits = run_distributed(_train_and_probe, 2, args=(jobs, ids, mask), init=engine, timeout_s=600)[0]
        for name, _ in jobs:
            found[name] = (out / name, logits[name])
    return found


@pytest.fixture(autouse=True)
def no_key(monkeypatch):
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)


def _export(*args: str) -> int:
    from optsel.launch.cli import main

    return main(["export", *map(str, args)])


def _report(stdout: str) -> dict:
    """The export's JSON report (DeepSpeed's logger may print a line to stdout before it)."""
    lines = stdout.splitlines()
    return json.loads("\n".join(lines[next(i for i, line in enumerate(lines) if line == "{") :]))


def _logits(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err < 1e-4, f"exported logits differ from the trained model's by up to {err:.3g}"


# -- both engines: load with transformers, match the live model --------------------------------------
@pytest.mark.parametrize("name", ["fsdp2", "deepspeed"])
def test_export_loads_with_transformers_and_matches_the_trained_model(runs, data_dir, tmp_path, name, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, live = runs[name]
    out = tmp_path / "hf"
    assert _export(run_dir, "--out", out) == 0
    report = _report(capsys.readouterr().out)
    assert report["step"] == STEPS and report["engine"] == name and report["world_size"] == 2
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(report["files"])
    assert not list(tmp_path.glob(".hf.export-*")), "the temporary folder was left behind"
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert model.config.tie_word_embeddings is (name == "deepspeed")
    if name == "deepspeed":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    ids, mask = _probe(data_dir)
    batch = tok(PROBE_TEXT, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], ids), "the exported tokenizer encodes differently from the run's"
    _assert_close(_logits(model, ids, mask), live)


def test_an_earlier_step_and_an_unknown_step(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    run_dir, live = runs["fsdp2"]
    assert _export(run_dir, "--out", tmp_path / "s1", "--checkpoint", "1") == 0
    assert _report(capsys.readouterr().out)["step"] == 1
    ids = torch.arange(3, 19).reshape(1, 16)
    one = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "s1"), ids, torch.ones_like(ids))
    assert _export(run_dir / "checkpoints" / "step_00000002", "--out", tmp_path / "s2") == 0  # a checkpoint folder
    capsys.readouterr()
    two = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "s2"), ids, torch.ones_like(ids))
    assert float((one - two).abs().max()) > 1e-3, "step 1 and step 2 exported the same weights"
    assert _export(run_dir, "--out", tmp_path / "adapter", "--lora", "adapter") == 2
    assert "trained no LoRA adapters" in capsys.readouterr().err and not (tmp_path / "adapter").exists()
    assert _export(run_dir, "--out", tmp_path / "s7", "--checkpoint", "7") == 2
    err = capsys.readouterr().err
    assert "no complete checkpoint of step 7" in err and "steps 1, 2" in err
    assert not (tmp_path / "s7").exists()


# -- LoRA: merged, and as peft's adapter folder ------------------------------------------------------
def test_lora_merge_and_adapter(runs, data_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, live = runs["lora"]
    ids, mask = _probe(data_dir)
    assert _export(run_dir, "--out", tmp_path / "merged") == 0
    assert _report(capsys.readouterr().out)["lora"] == "merged"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    _assert_close(_logits(merged, ids, mask), live)

    assert _export(run_dir, "--out", tmp_path / "adapter", "--lora", "adapter") == 0
    assert _report(capsys.readouterr().out)["lora"] == "adapter"
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "adapter" / "base").resolve())
    assert adapter_config["r"] == 4 and set(adapter_config["target_modules"]) == {"q_proj", "v_proj", "down_proj"}
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    base_logits = _logits(base, ids, mask)
    assert float((base_logits - live).abs().max()) > 1e-3, "the adapters changed nothing: the test proves nothing"
    with_adapter = PeftModel.from_pretrained(base, tmp_path / "adapter")
    _assert_close(_logits(with_adapter, ids, mask), live)


# -- untrusted checkpoints ------------------------------------------------------------------------------
def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, ignore=shutil.ignore_patterns(".optsel.lock"))
    return dest


def _rehash(step: Path) -> None:
    """What someone without the key can do after editing a file: recompute the manifest."""
    from optsel.pipeline.checkpoint.manager import build_manifest

    meta = json.loads((step / "meta.json").read_text())
    meta["manifest"] = build_manifest(step)
    (step / "meta.json").write_text(json.dumps(meta))


def test_a_tampered_checkpoint_is_refused(runs, tmp_path, capsys):
    run = _copy_run(runs["fsdp2"][0], tmp_path / "run")
    shard = run / "checkpoints" / "step_00000002" / "engine" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert _export(run, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "__1_0.distcp fails its SHA-256 check" in err and "checkpoint.resume" not in err, err
    assert "older complete ones: step_00000001: export one with --checkpoint STEP" in err  # no silent fallback
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.export-*"))


def test_hmac_rules_are_the_resume_rules(runs, tmp_path, monkeypatch, capsys):
    from optsel.pipeline.checkpoint.manager import sign

    run = _copy_run(runs["fsdp2"][0], tmp_path / "run")
    step = run / "checkpoints" / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    meta["hmac"] = sign(meta, b"the key")
    (step / "meta.json").write_text(json.dumps(meta))
    assert _export(run, "--out", tmp_path / "a") == 2
    assert "HMAC-signed but no key is configured" in capsys.readouterr().err
    monkeypatch.setenv("OPTSEL_CHECKPOINT_KEY", "another key")
    assert _export(run, "--out", tmp_path / "b") == 2
    assert "HMAC does not match" in capsys.readouterr().err
    monkeypatch.setenv("OPTSEL_CHECKPOINT_KEY", "the key")
    assert _export(run, "--out", tmp_path / "c") == 0
    assert json.loads((tmp_path / "c" / "export.json").read_text())["signed"] is True
    monkeypatch.delenv("OPTSEL_CHECKPOINT_KEY")
    assert _export(run, "--out", tmp_path / "d", "--allow-unsigned") == 0
    capsys.readouterr()


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_never_run(runs, tmp_path, capsys):
    """A re-hashed (unsigned) checkpoint whose DeepSpeed model states or DCP metadata hold a code payload."""
    marker = tmp_path / "payload-ran"
    ds = _copy_run(runs["deepspeed"][0], tmp_path / "ds") / "checkpoints" / "step_00000002"
    states = ds / "engine" / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    torch.save({"buffer_names": [], "payload": _Payload(marker)}, states)
    _rehash(ds)
    assert _export(ds, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "model_states.pt holds pickled objects" in err and "posix.system" in err, err

    fs = _copy_run(runs["fsdp2"][0], tmp_path / "fs") / "checkpoints" / "step_00000002"
    (fs / "engine" / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _rehash(fs)
    assert _export(fs, "--out", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert ".metadata holds pickled objects outside the allowlist" in err, err
    assert not marker.exists(), "code from the checkpoint ran"
    assert not (tmp_path / "out").exists()


def test_dcp_metadata_cannot_point_outside_the_checkpoint(runs, tmp_path, capsys):
    from optsel.pipeline.checkpoint.safe_load import dcp_reader_and_planner

    step = _copy_run(runs["fsdp2"][0], tmp_path / "fs") / "checkpoints" / "step_00000002"
    metadata = dcp_reader_and_planner(step / "engine")[0].read_metadata()
    for info in metadata.storage_data.values():
        info.relative_path = "../../../outside.distcp"
    metadata.storage_meta = None
    (step / "engine" / ".metadata").write_bytes(pickle.dumps(metadata))
    _rehash(step)
    assert _export(step, "--out", tmp_path / "out") == 2
    assert "outside the checkpoint folder" in capsys.readouterr().err


def test_a_model_config_that_does_not_fit_the_weights(runs, tmp_path, capsys):
    run = _copy_run(runs["fsdp2"][0], tmp_path / "run")
    step = run / "checkpoints" / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    meta["config"]["model"]["num_hidden_layers"] = 1
    (step / "meta.json").write_text(json.dumps(meta))  # meta.json is not in its own manifest: unsigned, it verifies
    assert _export(run, "--out", tmp_path / "a") == 2  # the run folder's config.yaml disagrees
    assert "model.num_hidden_layers: checkpoint 1, config.yaml 2" in capsys.readouterr().err
    (run / "config.yaml").unlink()  # nothing to compare with: the weights themselves do not fit
    assert _export(step, "--out", tmp_path / "b") == 2
    assert "weight(s) the run's model has no place for (e.g. model.layers.1." in capsys.readouterr().err


# -- where it writes; what is missing --------------------------------------------------------------------
def test_out_is_never_overwritten_unless_asked(runs, tmp_path, capsys):
    run_dir = runs["fsdp2"][0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("a user's file")
    assert _export(run_dir, "--out", out) == 2
    assert "is not empty" in capsys.readouterr().err and (out / "mine.txt").read_text() == "a user's file"
    assert _export(run_dir, "--out", out, "--overwrite") == 0
    replaced = _report(capsys.readouterr().out)["replaced"]
    assert (Path(replaced) / "mine.txt").read_text() == "a user's file"
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _export(run_dir, "--out", empty) == 0  # an empty folder is fine
    capsys.readouterr()


def test_no_run_no_checkpoint_no_tokenizer(runs, data_dir, tmp_path, capsys):
    assert _export(tmp_path / "nowhere", "--out", tmp_path / "o") == 2
    assert "does not exist" in capsys.readouterr().err
    bare = tmp_path / "bare"
    (bare / "checkpoints" / "step_00000003.partial").mkdir(parents=True)
    assert _export(bare, "--out", tmp_path / "o") == 2
    assert "no complete checkpoint under" in (err := capsys.readouterr().err) and "step_00000003.partial" in err
    run = _copy_run(runs["fsdp2"][0], tmp_path / "run")
    step = run / "checkpoints" / "step_00000002"
    meta = json.loads((step / "meta.json").read_text())
    meta["config"]["data"]["local"] = str(tmp_path / "moved-away")
    (step / "meta.json").write_text(json.dumps(meta))
    assert _export(step, "--out", tmp_path / "o") == 2  # config.yaml still names the data where it was
    assert "data.local: checkpoint" in capsys.readouterr().err
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["local"] = meta["config"]["data"]["local"]
    (run / "config.yaml").write_text(yaml.safe_dump(config))  # the data folder moved away after training
    assert _export(step, "--out", tmp_path / "o") == 2
    assert "pass --tokenizer DIR" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert _export(step, "--out", tmp_path / "o", "--tokenizer", data_dir / "tokenizer") == 0
    assert _report(capsys.readouterr().out)["step"] == STEPS


def test_lora_on_a_local_model_names_its_base(runs, data_dir, tmp_path, capsys):
    """FSDP2 + LoRA on a user's model folder: the adapter points at that folder (no copy of the base)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, live = runs["local_lora"]
    base_dir = run_dir.parent / "my-base"
    ids, mask = _probe(data_dir)
    assert _export(run_dir, "--out", tmp_path / "adapter", "--lora", "adapter") == 0
    capsys.readouterr()
    assert not (tmp_path / "adapter" / "base").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir.resolve()
    )
    with_adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    _assert_close(_logits(with_adapter, ids, mask), live)
    assert _export(run_dir, "--out", tmp_path / "merged") == 0
    capsys.readouterr()
    _assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), ids, mask), live)
