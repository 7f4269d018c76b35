"""Bad input, end to end (the table in docs/reliability.md): NaN/Inf loss or gradient in real training
on each engine, pickle-encoded or wrongly typed shard columns, over-long samples, secrets in the
config dump. Each is a named error or a counted, logged fallback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from support.common import REPO
from support.dist import run_distributed


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("bad-shards", num_train=512, num_val=64)


# -- NaN / Inf in training ---------------------------------------------------------------------------
def _poison_second_training_forward(model: torch.nn.Module, what: str) -> None:
    """Forward hook on the first decoder layer: on the 2nd training-mode forward, make the loss NaN
    ("loss") or leave the loss finite and make the gradient NaN ("grad")."""
    from optsel.pipeline.engines.fsdp2_engine import decoder_layers

    calls = {"n": 0}

    def hook(module, args, output):
        if not module.training:
            return None
        calls["n"] += 1
        if calls["n"] != 2:
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        if what == "loss":
            hidden = hidden * float("nan")
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        hidden.register_hook(lambda g: torch.full_like(g, float("inf")))
        return None

    decoder_layers(model)[0].register_forward_hook(hook)


def _nan_runs(rank: int, world: int, overrides: list[str]) -> dict:
    from optsel.pipeline.train.run_config import load_run_config
    from optsel.pipeline.train.trainer import NonFiniteLossError, Trainer

    out = {}
    for what, policy in (("loss", "skip"), ("grad", "skip"), ("grad", "raise")):
        config = load_run_config(
            REPO / "configs/demo.yaml", overrides + [f"run_name={what}-{policy}", f"training.nan_policy={policy}"]
        )
        trainer = Trainer(config)
        _poison_second_training_forward(trainer.engine.unwrapped_model, what)
        try:
            summary = trainer.train()
            params_finite = all(
                bool(
                    torch.isfinite(
                        p.detach().float() if not hasattr(p, "full_tensor") else p.full_tensor().float()
                    ).all()
                )
                for p in trainer.engine.unwrapped_model.parameters()
            )
            out[f"{what}-{policy}"] = {"summary": summary, "params_finite": params_finite}
        except NonFiniteLossError as err:
            out[f"{what}-{policy}"] = {"error": str(err)}
        finally:
            trainer.close()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["fsdp2", "deepspeed"])
def test_nan_loss_and_gradient_skip_the_step_or_raise(data_dir, tmp_path, engine):
    overrides = [
        f"data.local={data_dir}",
        f"output_dir={tmp_path}",
        "training.progress_bar=false",
        "training.num_eval_samples=16",
        "monitoring.port=0",
        "training.eval_every=0",
        f"engine.name={engine}",
        "selection.method=random",
        "training.num_steps=4",
        "selection.pool_size=8",
        "selection.budget=4",
        "selection.num_target_samples=4",
        "training.max_skipped_steps=1",
        "data.max_seq_len=10",
    ]
    results = run_distributed(_nan_runs, 1, args=(overrides,), init=engine, timeout_s=600)[0]
    for name in ("loss-skip", "grad-skip"):
        run = results[name]
        assert "error" not in run, run
        assert run["summary"]["skipped_steps"] == 1 and run["summary"]["num_steps"] == 4
        assert run["params_finite"], f"{name}: NaN/Inf reached the weights"
        metrics = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        step2 = next(m for m in metrics if m["step"] == 2)
        assert step2["train/skipped_steps"] == 1 and step2["train/grad_norm"] is None  # NaN → null in JSON
        assert step2["data/truncated_samples"] > 0  # data.max_seq_len=10 cut some samples, counted
        if name == "grad-skip":
            assert step2["train/loss"] is not None, "the loss was finite; only the gradient was poisoned"
        assert np.isfinite(run["summary"]["final_eval_loss"])
    assert "NaN/Inf loss or gradient" in results["grad-raise"]["error"]


# -- shards ------------------------------------------------------------------------------------------
def _write_shard(out: Path, columns: dict[str, str], rows: list[dict]) -> Path:
    from optsel.pipeline.data.streaming_compat import MDSWriter

    with MDSWriter(out=str(out), columns=columns, compression=None) as writer:
        for row in rows:
            writer.write(row)
    return out


def _rows(n: int, tokens_as=np.int32) -> list[dict]:
    return [
        {"tokens": np.arange(3, 9, dtype=tokens_as), "prompt_len": 2, "sample_id": i, "kind_id": 0} for i in range(n)
    ]


def test_pickle_columns_are_refused_unless_allowed(tmp_path):
    from optsel.pipeline.data.shards import ShardError, verify_split

    columns = {
        "tokens": "ndarray:int32",
        "prompt_len": "int32",
        "sample_id": "int64",
        "kind_id": "int32",
        "meta": "pkl",
    }
    split = _write_shard(tmp_path / "train", columns, [{**r, "meta": {"a": 1}} for r in _rows(4)])
    with pytest.raises(ShardError, match=r"column\(s\) \['meta'\] are pickle-encoded.*data.allow_pickle=true"):
        verify_split(split, "none")
    assert verify_split(split, "hash", allow_pickle=True) == 4


@pytest.mark.parametrize(
    "columns, message",
    [
        (
            {"tokens": "str", "prompt_len": "int32", "sample_id": "int64", "kind_id": "int32"},
            r"column 'tokens' has encoding 'str', expected one of \['ndarray:int8'",
        ),
        (
            {"tokens": "ndarray:float32", "prompt_len": "int32", "sample_id": "int64", "kind_id": "int32"},
            r"column 'tokens' has encoding 'ndarray:float32'",
        ),
        ({"tokens": "ndarray:int32", "prompt_len": "int32", "sample_id": "int64"}, r"column 'kind_id' is missing"),
    ],
)
def test_wrong_column_types_are_named(tmp_path, columns, message):
    from optsel.pipeline.data.shards import ShardError, verify_split

    rows = _rows(3, np.float32 if columns["tokens"] == "ndarray:float32" else np.int32)
    if columns["tokens"] == "str":
        rows = [{**r, "tokens": "3 4 5"} for r in rows]
    rows = [{k: v for k, v in r.items() if k in columns} for r in rows]
    with pytest.raises(ShardError, match=message):
        verify_split(_write_shard(tmp_path / "train", columns, rows), "none")


def test_max_seq_len_beyond_the_model_is_a_config_error(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.train",
            "configs/demo.yaml",
            f"data.local={data_dir}",
            f"output_dir={tmp_path}",
            "engine.name=fsdp2",
            "data.max_seq_len=4096",
            "monitoring.port=0",
            "training.progress_bar=false",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "data.max_seq_len" in done.stderr and "max_position_embeddings=64" in done.stderr


def test_config_dump_redacts_secrets(tmp_path):
    import yaml

    from optsel.config_loader import dump_yaml
    from optsel.pipeline.train.run_config import load_run_config

    config = load_run_config(
        REPO / "configs/demo.yaml",
        ["data.remote=s3://AKIAEXAMPLE:hunter2@bucket/ds", "engine.extra.wandb_api_key=abc123"],
    )
    dump_yaml(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "hunter2" not in text and "AKIAEXAMPLE" not in text and "abc123" not in text
    dumped = yaml.safe_load(text)
    assert dumped["data"]["remote"] == "s3://***@bucket/ds" and dumped["engine"]["extra"]["wandb_api_key"] == "***"
    assert dumped["selection"]["budget"] == config.selection.budget  # nothing else changed


def test_malformed_and_conflicting_configs_are_named(tmp_path):
    from optsel.config_loader import ConfigError, load_yaml
    from optsel.pipeline.train.run_config import load_run_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  num_steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match=r"selection.budget.*pool_size"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.budget=65"])
    config = load_run_config(REPO / "configs/demo.yaml", ["selection.pool_size=63", "selection.budget=8"])
    with pytest.raises(ConfigError, match=r"'selection.pool_size': must be divisible by the world size 2"):
        config.validate_for_world(2)
    with pytest.raises(ConfigError, match=r"selection.options.ftw.exchange.*'sketches' needs gram='sketch'"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.options.ftw.exchange=sketches"])


def test_missing_target_split_is_named(data_dir, tmp_path):
    import shutil

    broken = tmp_path / "no-val"
    shutil.copytree(data_dir, broken)
    shutil.rmtree(broken / "val")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.train",
            "configs/demo.yaml",
            f"data.local={broken}",
            f"output_dir={tmp_path}",
            "engine.name=fsdp2",
            "monitoring.port=0",
            "training.progress_bar=false",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    assert f"no MDS index at {broken / 'val' / 'index.json'}" in done.stderr, done.stderr[-2000:]
