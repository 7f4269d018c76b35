"""Does the single pass give the two-pass gradient on this device? (plain model and FSDP2, 1 process)

    python -m benchmarks.single_pass_check [--device cuda] [--dtype bfloat16]

Builds a small Llama, takes an FTW selection with the single pass, and compares the gradient it
forms from the capture (plain: ``accumulate_into_grads``; FSDP2: the engine's
``backward_from_pass``) with a forward/backward of Σ w_i ℓ_i over the chosen rows. Prints the
largest relative difference per path; exits 1 above the tolerance (1e-4 fp32, 2e-2 bf16).
The 2-rank ZeRO-3 and FSDP2 equivalence is tests/distributed/test_engines.py on CPU.
"""

from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.speed import build_model, make_pool
from optsel.losses import per_sample_token_mean_ce
from optsel.selection import FilterThenWeight, FTWConfig


def _two_pass_grads(model, pool, rows, weights) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    sub = {k: v[rows] for k, v in pool.items()}
    logits = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
    (per_sample_token_mean_ce(logits, sub["labels"]).loss * weights.to(logits.device, torch.float32)).sum().backward()
    return {n: _full(p.grad).float().clone() for n, p in model.named_parameters()}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[n] - b[n]).abs().max() / (b[n].abs().max() + 1e-12)) for n in b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    model = build_model(device, max_pos=64).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    pool, target = make_pool(32, 48, 1, device), make_pool(8, 48, 2, device)
    ftw = FilterThenWeight(model, opt, FTWConfig(budget=8, filter_size=16, gram="exact"))
    sel = ftw.select(pool, target)
    rows, weights = sel.local_indices.to(device), sel.local_weights
    model.zero_grad(set_to_none=True)
    sel.pool_pass.accumulate_into_grads(rows, weights)
    single = {n: p.grad.float().clone() for n, p in model.named_parameters()}
    plain = _worst(single, _two_pass_grads(model, pool, rows, weights))
    print(f"plain {device} {args.dtype}: max relative gradient difference single vs two-pass {plain:.2e}")

    from optsel.pipeline.engines.shared import EngineConfig, OptimizerConfig, build_engine

    engine = build_engine(
        EngineConfig(name="fsdp2", deepspeed_config="", precision="fp32" if dtype == torch.float32 else "bf16"),
        build_model(device, max_pos=64),
        OptimizerConfig(lr=1e-3),
        total_steps=2,
        micro_batch_size=32,
    )
    ftw = FilterThenWeight(engine.unwrapped_model, engine.optimizer, FTWConfig(budget=8, filter_size=16, gram="exact"))
    sel = ftw.select(pool, target)
    engine.backward_from_pass(sel.pool_pass, sel.local_indices, sel.local_weights.float(), loss_scale=1.0)
    single = {n: _full(p.grad).float().clone() for n, p in engine.unwrapped_model.named_parameters()}
    engine.skip_step()
    engine.forward_backward(
        {k: v[sel.local_indices.to(device)].cpu() for k, v in pool.items()}, sel.local_weights.float(), loss_scale=1.0
    )
    two = {n: _full(p.grad).float().clone() for n, p in engine.unwrapped_model.named_parameters()}
    fsdp = _worst(single, two)
    print(f"fsdp2 {device} {args.dtype}: max relative gradient difference single vs two-pass {fsdp:.2e}")
    engine.close()
    ok = plain <= tol and fsdp <= tol
    print("OK" if ok else f"FAILED (tolerance {tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
