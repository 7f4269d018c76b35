"""Quiet by default: a run prints no third-party deprecation warnings; ``--verbose``
shows them (and DEBUG logs). The DeepSpeed ZeRO-3 run is where torch's collective aliases warned on
every step; greedy decoding is where transformers' ``past_key_values`` rename warned."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from support.common import REPO

DEPRECATION = ("FutureWarning", "DeprecationWarning", "is deprecated")


@pytest.fixture(scope="module")
def data_dir(prepare_synthetic) -> Path:
    return prepare_synthetic("quiet", num_train=256, num_val=32)


def _train(data_dir: Path, run_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """One process of `optsel train` on DeepSpeed ZeRO-3: 2 steps, a short evaluation (decoding)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("PYTHONWARNINGS", "OPTSEL_VERBOSE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.cli",
            "train",
            *flags,
            "configs/demo.yaml",
            f"data.local={data_dir}",
            f"output_dir={run_dir}",
            "engine.name=deepspeed",
            "training.num_steps=2",
            "training.eval_every=0",
            "training.num_eval_samples=4",
            "training.max_new_tokens=2",
            "training.progress_bar=false",
            "monitoring.enabled=false",
            "checkpoint.every_steps=0",
            "training.callbacks.plot=false",
            "selection.pool_size=16",
            "selection.budget=4",
            "selection.num_target_samples=4",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_a_run_is_quiet_by_default_and_verbose_shows_all(data_dir, tmp_path):
    quiet = _train(data_dir, tmp_path / "quiet")
    assert quiet.returncode == 0, quiet.stderr[-3000:]
    noisy = [line for line in quiet.stderr.splitlines() if any(word in line for word in DEPRECATION)]
    assert not noisy, "deprecation warnings in a default run:\n" + "\n".join(noisy[:10])
    assert " DEBUG " not in quiet.stderr and "streaming.base.dataset" not in quiet.stderr  # streaming's INFO defaults

    verbose = _train(data_dir, tmp_path / "verbose", "--verbose")
    assert verbose.returncode == 0, verbose.stderr[-3000:]
    assert "FutureWarning: `torch.distributed.reduce_scatter_tensor` is deprecated" in verbose.stderr
    assert " DEBUG " in verbose.stderr
    assert "past_key_values" not in verbose.stderr  # optsel passes the KV cache as `cache` (not filtered: not called)


def test_greedy_decoding_uses_the_current_cache_argument():
    """transformers renamed the forward's KV-cache argument; decoding passes the new name, so nothing warns
    even with every warning shown, and the tokens are those of full forwards."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optsel.pipeline.engines import shared

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    ).eval()
    ids = torch.randint(3, 32, (2, 5))
    mask = torch.ones_like(ids)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = shared.greedy_generate(model, ids, mask, 4, torch.device("cpu"))
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], [
        str(w.message) for w in caught
    ]
    full = ids
    for _ in range(4):
        full = torch.cat([full, model(input_ids=full).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, full[:, 5:])
