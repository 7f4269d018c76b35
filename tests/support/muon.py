"""Brute force for FTW's Muon geometry: a hybrid Muon + AdamW model, the real torch.optim.Muon update and its
Jacobian with respect to the gradient (torch.func.jacfwd), and (b, K) from it with torch.func per-sample gradients."""

from __future__ import annotations

import contextlib

import torch

from support.bruteforce import adam_precond, make_batch, per_sample_grads

MUON_LR, ADAM_LR = 0.02, 0.01


def _hybrid(model, nesterov=True, adjust_lr_fn=None, momentum=0.9):
    """torch.optim.Muon on the hidden 2-D weights, AdamW on embeddings, the head, norms and biases."""
    muon, adam = [], []
    for name, p in model.named_parameters():
        hidden = (
            p.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name and "lm_head" not in name
        )
        (muon if hidden else adam).append(p)
    return [
        torch.optim.Muon(
            muon, lr=MUON_LR, momentum=momentum, nesterov=nesterov, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn
        ),
        torch.optim.AdamW(adam, lr=ADAM_LR, betas=(0.9, 0.99), weight_decay=0.1),
    ]


def _train(model, opts, steps, seed=100):
    from optsel.losses import per_sample_token_mean_ce

    for s in range(steps):
        batch = make_batch(6, 8, seed + s)
        for o in opts:
            o.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sample_token_mean_ce(logits, batch["labels"]).loss.mean().backward()
        for o in opts:
            o.step()
    for o in opts:
        o.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _exact_ns():
    """torch's Muon without its bfloat16 cast (Tensor.bfloat16 → a same-dtype copy), recording NS's input."""
    import torch.optim._muon as muon_mod

    seen: list[torch.Tensor] = []
    original_ns, original_bf16 = muon_mod._zeropower_via_newtonschulz, torch.Tensor.bfloat16

    def recording(grad, *args):
        seen.append(grad)
        return original_ns(grad, *args)

    muon_mod._zeropower_via_newtonschulz = recording
    torch.Tensor.bfloat16 = lambda self: self.clone()  # a copy, as the cast makes
    try:
        yield seen
    finally:
        muon_mod._zeropower_via_newtonschulz = original_ns
        torch.Tensor.bfloat16 = original_bf16


def _real_update(opt, param):
    """δ ↦ (θ(1 − ηλ) − θ_new(δ)) / η_ref: one real Muon step with gradient δ on a clone of the state,
    per unit of the reference (AdamW) lr."""
    import torch.optim._muon as muon_mod

    group = next(g for g in opt.param_groups if any(p is param for p in g["params"]))
    theta0 = param.detach().clone()
    buf0 = opt.state[param]["momentum_buffer"].detach().clone()

    def update(delta):
        theta = theta0 + 0 * delta  # at the transform's level, so the in-place step may write into it
        buf = buf0 + 0 * delta
        muon_mod.muon(
            [theta],
            [delta],
            [buf],
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            nesterov=group["nesterov"],
            ns_coefficients=group["ns_coefficients"],
            eps=group["eps"],
            ns_steps=group["ns_steps"],
            adjust_lr_fn=group["adjust_lr_fn"],
            has_complex=False,
        )
        return (theta0 * (1 - group["lr"] * group["weight_decay"]) - theta) / ADAM_LR

    return update


def _brute(model, opts, pool, target, names, rho, tau, geometry="auto"):
    """(b, K) of docs/design.md#muon-geometry from the real optimizer's Jacobian and torch.func per-sample gradients."""
    muon, adamw = opts
    params = dict(model.named_parameters())
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    gp, gt = per_sample_grads(model, pool, names), per_sample_grads(model, target, names)
    n = len(gp)
    b, K = torch.zeros(n, dtype=torch.float64), torch.zeros(n, n, dtype=torch.float64)
    inv_c = 1.0 / tau  # γ = 1: c' = τ
    for name in names:
        p = params[name]
        G = torch.stack([g[name] for g in gp]).reshape(n, -1)
        gv = (sum(g[name] for g in gt) / len(gt)).reshape(-1)
        if id(p) in muon_ids:
            update = _real_update(muon, p)
            with _exact_ns() as seen:
                zero = torch.zeros_like(p)
                u0 = update(zero).reshape(-1)
                X0 = seen[0].reshape(-1)
                J = torch.func.jacfwd(update)(zero).reshape(p.numel(), p.numel())
            s = float(X0 @ u0 / (u0 @ u0))
            JG = G @ J.T
            b += inv_c * JG @ (gv - s * u0)
            K += s * inv_c**2 * JG @ JG.T
        else:
            if geometry == "auto" and adamw.state.get(p):
                P, mhat = (t.reshape(-1) for t in adam_precond(adamw, p))
            else:
                P, mhat = torch.ones_like(gv), torch.zeros_like(gv)
            b += G @ (P * (gv - rho * mhat))
            K += (G * P) @ G.T
    return b, K


def _rel(x, y):
    return float((x - y).norm() / y.norm())
