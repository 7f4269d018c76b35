"""Tiny models, padded pools and brute-force per-sample gradients for the FTW math tests.

The brute force runs each sample *alone* and *unpadded* through the model (torch.func.grad of its
own token-mean loss w.r.t. the parameters via functional_call), so it checks the capture's
rescaling and padding handling as well as the factor math.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad

VOCAB = 50


def tiny_llama(tie: bool = False, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).double().eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return GPT2LMHeadModel(cfg).double().eval()


def tiny_lora_llama(seed: int = 0) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed=seed)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    peft_model = get_peft_model(model, lora)
    torch.manual_seed(seed + 1)
    for name, p in peft_model.named_parameters():  # lora_B starts at 0: make gradients of lora_A non-zero
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)
    return peft_model


def make_batch(n: int, max_len: int, seed: int, prompt: int = 2, min_len: int = 4) -> dict[str, torch.Tensor]:
    """Right-padded batch of n samples with lengths in [min_len, max_len]; labels -100 on the
    first ``prompt`` tokens and on padding."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=gen)
    lengths[0] = max_len
    ids = torch.randint(1, VOCAB, (n, max_len), generator=gen)
    mask = (torch.arange(max_len)[None] < lengths[:, None]).long()
    ids = ids * mask
    labels = ids.clone()
    labels[:, :prompt] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 100) -> None:
    from optsel.losses import per_sample_token_mean_ce

    for s in range(steps):
        batch = make_batch(6, 8, seed + s)
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        per_sample_token_mean_ce(logits, batch["labels"]).loss.mean().backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def per_sample_grads(
    model: nn.Module, batch: dict[str, torch.Tensor], names: list[str]
) -> list[dict[str, torch.Tensor]]:
    """g_i for every sample i (run alone, unpadded): {param name: grad}, param layout."""
    from optsel.losses import per_sample_token_mean_ce

    params = dict(model.named_parameters())
    chosen = {k: params[k].detach() for k in names}
    frozen = {k: v.detach() for k, v in params.items() if k not in chosen}

    def loss_fn(p, ids, mask, labels):
        out = functional_call(model, {**frozen, **p}, args=(), kwargs={"input_ids": ids, "attention_mask": mask})
        return per_sample_token_mean_ce(out.logits, labels).loss.sum()

    out = []
    for i in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][i].sum())
        sl = lambda k: batch[k][i : i + 1, :length]  # noqa: E731
        out.append(grad(loss_fn)(chosen, sl("input_ids"), sl("attention_mask"), sl("labels")))
    return out


def adam_precond(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(P, m̂) of ``param`` from torch AdamW state, param layout."""
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    state = optimizer.state[param]
    t = int(state["step"])
    b1, b2 = group["betas"]
    vhat = state["exp_avg_sq"] / (1 - b2**t)
    return 1.0 / (vhat.sqrt() + group["eps"]), state["exp_avg"] / (1 - b1**t)


def brute_force(
    model,
    optimizer,
    pool,
    target,
    names,
    rho: float,
    tau: float,
    geometry: str = "adam",
    batch_share: int | None = None,
):
    """(b [N], K [N, N], u [N]) from explicit per-sample gradients and explicit P, m̂.
    u = b − (τ/2) K_ii, or b − (τ/(2k)) K_ii with ``batch_share=k`` (FTWConfig.filter_curvature="batch")."""
    params = dict(model.named_parameters())
    gp = per_sample_grads(model, pool, names)
    gt = per_sample_grads(model, target, names)
    N = len(gp)
    b = torch.zeros(N, dtype=torch.float64)
    K = torch.zeros(N, N, dtype=torch.float64)
    for name in names:
        if geometry == "adam" and optimizer.state.get(params[name]):
            P, mhat = adam_precond(optimizer, params[name])
        else:
            P, mhat = torch.ones_like(params[name]), torch.zeros_like(params[name])
        gv = sum(g[name] for g in gt) / len(gt)
        direction = gv - rho * mhat
        G = torch.stack([g[name] for g in gp]).reshape(N, -1)
        Pf = P.reshape(-1)
        b += G @ (Pf * direction.reshape(-1))
        K += (G * Pf) @ G.T
    u = b - 0.5 * (tau / (batch_share or 1)) * K.diagonal()
    return b, K, u


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    rx = x.argsort().argsort().double()
    ry = y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def trained_llama(
    *, seed: int, steps: int, pool_size: int, betas: tuple[float, float] = (0.9, 0.999), batch_seed: int = 41
) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The tests' ``trained`` fixture: tiny_llama(seed) after ``steps`` AdamW steps (lr 1e-2, ``betas``), a
    pool of ``pool_size`` samples (≤ 9 tokens, seed ``batch_seed``) and a target of 4 (≤ 8 tokens, seed
    ``batch_seed`` + 1): (model, optimizer, pool, target)."""
    model = tiny_llama(seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=betas)
    train_steps(model, opt, steps)
    return model, opt, make_batch(pool_size, 9, seed=batch_seed), make_batch(4, 8, seed=batch_seed + 1)


def odd_llama(dtype: torch.dtype = torch.float32) -> nn.Module:
    """A 1-layer Llama with odd sizes, so FSDP2's and ZeRO-3's row chunks split unevenly: q [24, 27],
    k/v [8, 27], o [27, 24], gate/up [45, 27], down [27, 45], lm_head [50, 27] (untied)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=27,
        intermediate_size=45,
        num_hidden_layers=1,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(dtype)
