"""`optsel compare` (launch/compare.py): the demo's side-by-side of random and FTW, and its bad inputs.

The end-to-end test trains two real tiny runs (random, ftw; one process, 3 steps) from the demo's configs and
compares them through the CLI; the others read hand-written run folders (inputs, not mocks of anything).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optsel.launch.compare import main, notes, plot, read_run, table

from support.common import REPO


def _run_dir(
    root: Path,
    name: str,
    method: str,
    final_loss: float,
    final_em: float,
    steps: int = 4,
    curve: tuple[float, ...] = (2.0, 1.5),
) -> Path:
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "method": method,
        "num_steps": steps,
        "pool_size": 16,
        "budget": 4,
        "initial_eval_loss": 2.0,
        "final_eval_loss": final_loss,
        "initial_exact_match": 0.0,
        "final_exact_match": final_em,
        "mean_step_seconds": 0.25,
        "wall_seconds": 3.0,
    }
    (run / "summary.json").write_text(json.dumps(summary))
    lines = [{"step": 2 * i, "eval/loss": v, "eval/exact_match": 0.0} for i, v in enumerate(curve)]
    lines.insert(1, {"step": 1, "train/loss": 3.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_table_lists_both_runs_with_the_final_loss_difference(tmp_path):
    runs = [
        read_run(_run_dir(tmp_path, "demo-random", "random", 1.25, 0.10)),
        read_run(_run_dir(tmp_path, "demo-ftw", "ftw", 0.75, 0.40, curve=(2.0, 1.0, 0.75))),
    ]
    assert runs[1].curve == ((0, 2.0), (2, 1.0), (4, 0.75))
    text = table(runs)
    rows = text.splitlines()[2:]
    assert (
        len(rows) == 2 and rows[0].startswith("| demo-random | random |") and rows[1].startswith("| demo-ftw | ftw |")
    )
    assert "**1.250**" in rows[0] and "**0.750**" in rows[1] and "| -0.500 |" in rows[1]
    assert "**0.10**" in rows[0] and "**0.40**" in rows[1]
    assert notes(runs) == []
    png = plot(runs, tmp_path / "out" / "compare.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_of_different_lengths_are_compared_with_a_note(tmp_path, capsys):
    a = _run_dir(tmp_path, "a", "random", 1.0, 0.0, steps=4)
    b = _run_dir(tmp_path, "b", "ftw", 1.0, 0.0, steps=8)
    assert main([str(a), str(b)]) == 0
    assert "note: the runs differ in num_steps (a=4, b=8)" in capsys.readouterr().out


def test_bad_run_folders_are_refused_naming_the_file(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere' / 'summary.json'}: no summary.json" in capsys.readouterr().err
    broken = _run_dir(tmp_path, "broken", "ftw", 1.0, 0.0)
    (broken / "metrics.jsonl").write_text('{"step": 0, "eval/loss": 2.0}\n{"step": 1,\n')
    assert main([str(broken)]) == 2
    assert f"{broken / 'metrics.jsonl'}:2: not JSON" in capsys.readouterr().err
    partial = _run_dir(tmp_path, "partial", "ftw", 1.0, 0.0)
    (partial / "summary.json").write_text(json.dumps({"method": "ftw", "num_steps": 3}))
    with pytest.raises(ValueError, match=r"summary.json: missing key 'pool_size'"):
        read_run(partial)


def test_two_real_runs_of_the_demo_config_compare_through_the_cli(prepare_synthetic, tmp_path):
    """random and ftw on the same prepared stream and seed (configs/demo_compare.yaml; a tiny local model
    folder in place of the grid's pre-trained base, which takes ~30 s to write), 3 steps each, then
    `optsel compare`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from optsel.pipeline.data.tokenizer import byte_tokenizer

    data_dir = prepare_synthetic("compare-shards", num_train=128, num_val=48)
    tok = byte_tokenizer()
    base = tmp_path / "base"
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=32,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    ).save_pretrained(base)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    common = [
        "configs/demo_compare.yaml",
        f"data.local={data_dir}",
        f"output_dir={tmp_path}",
        f"model.path={base}",
        "engine.name=fsdp2",
        "training.num_steps=3",
        "training.eval_every=3",
        "training.num_eval_samples=8",
        "selection.num_target_samples=8",
        "selection.pool_size=8",
        "selection.budget=2",
        "monitoring.port=0",
        "checkpoint.every_steps=0",
        "training.progress_bar=false",
    ]
    for method in ("random", "ftw"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "optsel.launch.train",
                *common,
                f"selection.method={method}",
                f"run_name=demo-{method}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    png = tmp_path / "compare.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.cli",
            "compare",
            str(tmp_path / "demo-random"),
            str(tmp_path / "demo-ftw"),
            "--plot",
            str(png),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| demo-")]
    summaries = {m: json.loads((tmp_path / f"demo-{m}" / "summary.json").read_text()) for m in ("random", "ftw")}
    assert [r.split(" | ")[1] for r in rows] == ["random", "ftw"]
    for row, method in zip(rows, ("random", "ftw")):
        assert f"**{summaries[method]['final_eval_loss']:.3f}**" in row
        assert row.split(" | ")[2] == "3"
    delta = summaries["ftw"]["final_eval_loss"] - summaries["random"]["final_eval_loss"]
    assert f"| {delta:+.3f} |" in rows[1]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_run(tmp_path / "demo-ftw").curve[0][0] == 0 and read_run(tmp_path / "demo-ftw").curve[-1][0] == 3
