"""Shared setup of the two benchmarks: data streams, the pre-trained base model, trainer runs."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
SYNTH = REPO / "configs" / "prepare_synthetic.yaml"


@dataclass
class Scale:
    """One benchmark size. Pre-training: ``pretrain_steps`` of ``full`` on the distractor-only stream."""

    num_train: int
    num_val: int
    pretrain_steps: int
    pretrain_pool: int
    steps: int
    pool: int
    budget: int
    eval_every: int
    num_eval: int
    num_target: int
    seeds: tuple[int, ...]


QUICK = Scale(num_train=512, num_val=48, pretrain_steps=4, pretrain_pool=16, steps=4, pool=16, budget=4,
              eval_every=2, num_eval=16, num_target=8, seeds=(0,))
DEFAULT = Scale(num_train=8192, num_val=160, pretrain_steps=150, pretrain_pool=32, steps=60, pool=64, budget=16,
                eval_every=10, num_eval=96, num_target=32, seeds=(0, 1, 2))


def prepare_stream(out_dir: Path, num_train: int, num_val: int, target_fraction: float,
                   corrupted_fraction: float, seed: int = 0) -> Path:
    """An MDS stream from configs/prepare_synthetic.yaml with the given mix (rebuilt every time)."""
    from optsel.launch.config_loader import apply_overrides, from_mapping, load_yaml
    from optsel.pipeline.prepare import PrepareConfig, prepare

    data = apply_overrides(load_yaml(SYNTH), [f"out_dir={out_dir}", "overwrite=true", f"seed={seed}",
                                              f"synthetic.num_train={num_train}", f"synthetic.num_val={num_val}",
                                              f"synthetic.target_fraction={target_fraction}",
                                              f"synthetic.corrupted_fraction={corrupted_fraction}"])
    prepare(from_mapping(PrepareConfig, data))
    return out_dir


def base_overrides(run_name: str, out_dir: Path, data_dir: Path, scale: Scale, seed: int) -> list[str]:
    return [f"run_name={run_name}", f"output_dir={out_dir}", "engine.name=fsdp2", "monitoring.enabled=false",
            "training.progress_bar=false", f"data.local={data_dir}", f"data.shuffle_seed={seed}",
            f"training.seed={seed}", f"selection.seed={seed}", f"training.num_eval_samples={scale.num_eval}",
            f"selection.num_target_samples={scale.num_target}"]


def run_trainer(overrides: list[str]) -> tuple[dict[str, Any], Any]:
    """One single-process Trainer run; returns (summary, trainer) — close the trainer yourself."""
    from optsel.launch.run_config import load_run_config
    from optsel.pipeline.trainer import Trainer

    cfg = load_run_config(DEMO, overrides)
    if cfg.run_dir.exists():
        shutil.rmtree(cfg.run_dir)
    trainer = Trainer(cfg)
    summary = trainer.train()
    return summary, trainer


def save_base_model(trainer: Any, path: Path) -> Path:
    """Save the trained (possibly FSDP2-sharded) model as a plain Hugging Face folder."""
    from transformers import AutoModelForCausalLM

    module = trainer.engine.unwrapped_model
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
             for k, v in module.state_dict().items()}
    fresh = AutoModelForCausalLM.from_config(module.config)
    fresh.load_state_dict(state)
    if path.exists():
        shutil.rmtree(path)
    fresh.save_pretrained(path)
    return path


def pretrain(work: Path, scale: Scale) -> Path:
    """Distractor-only stream → short ``full`` run → saved base model folder."""
    general = prepare_stream(work / "data_general", scale.num_train, scale.num_val, 0.0, 0.0, seed=100)
    overrides = base_overrides("pretrain", work / "runs", general, scale, seed=100) + [
        "selection.method=full", f"selection.pool_size={scale.pretrain_pool}",
        f"selection.budget={scale.pretrain_pool}", f"training.num_steps={scale.pretrain_steps}",
        "training.eval_every=0"]
    summary, trainer = run_trainer(overrides)
    try:
        path = save_base_model(trainer, work / "base_model")
    finally:
        trainer.close()
    (work / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    return path


def quiet() -> None:
    logging.getLogger("optsel").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
