"""The demo's base model: the quality grid's pre-trained base (benchmarks/quality_grid.yaml ``settings``:
``pretrain_steps`` of plain training on the distractor tasks, look-alike included, plus 10 % clean target
samples), written as a Hugging Face model folder for ``model.source: local`` (configs/demo_compare.yaml).

The grid's evidence that FTW beats random is measured from this base, which knows the stream's formats but
not the target task; from fresh weights the first ~100 steps go to learning the formats, and random and FTW
end alike. ``python -m benchmarks.demo_base OUT_DIR`` (scripts/demo.sh; ~15-35 s on one core). The folder's
``grid.sha256`` records the grid file it came from; a rerun with the same grid file keeps the folder.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

import torch

from benchmarks.quality import GRID_FILE, load_grid
from benchmarks.quality_runs import new_model, pretrain


def write_base(out_dir: Path, grid_file: Path = GRID_FILE) -> bool:
    """Pre-train the grid's base model (its ``settings``, stream seed 0) and ``save_pretrained`` it to
    ``out_dir`` (config.json + model.safetensors + grid.sha256). Deterministic for a grid file; returns
    False (and writes nothing) when ``out_dir`` already holds the base of this grid file."""
    digest = hashlib.sha256(grid_file.read_bytes()).hexdigest()
    stamp = out_dir / "grid.sha256"
    if stamp.is_file() and stamp.read_text().strip() == digest and (out_dir / "config.json").is_file():
        return False
    settings = load_grid(grid_file, quick=False)["settings_obj"]
    torch.manual_seed(settings.stream_seed)
    state = pretrain(settings)
    model = new_model(settings)
    model.load_state_dict(state)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    stamp.write_text(digest + "\n")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.demo_base", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="the model folder to write (config.json + model.safetensors)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    if write_base(args.out_dir):
        print(f"base model (the quality grid's pre-trained base) -> {args.out_dir} in {time.perf_counter() - t0:.1f} s")
    else:
        print(f"base model: {args.out_dir} already holds the quality grid's pre-trained base (grid.sha256)")


if __name__ == "__main__":
    main()
