"""The model builder: a Hugging Face causal LM from a config (tiny Llama by default) or a local
checkpoint folder, optionally wrapped with LoRA adapters. Distributed-free: the engine shards it.

Weights are built in float32 (the engines keep fp32 master weights and pick the compute dtype).
Nothing is ever downloaded: a local model loads with ``local_files_only=True``, and never runs code from
its folder (``trust_remote_code=False``; a config with ``auto_map`` is refused naming the file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from optsel.pipeline.data.tokenizer import refuse_remote_code


@dataclass(kw_only=True)
class LoraSettings:
    """LoRA adapters (peft): rank ``r``, scaling ``alpha / r``, dropout on the adapter input, and the
    names of the linear modules that get adapters (matched by peft against module-name suffixes)."""

    r: int = 8  #: rank of the adapters
    alpha: float = 16.0  #: scaling numerator: adapters are scaled by alpha / r
    dropout: float = 0.0  #: dropout on the adapter input
    #: linear modules that get adapters (matched by peft against module-name suffixes)
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"r: must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ValueError(f"alpha: must be > 0, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ValueError("target_modules: must name at least one module")


@dataclass(kw_only=True)
class ModelConfig:
    """Which model to train.

    source "config": a freshly initialised ``arch`` model with the sizes below (seeded by
    ``init_seed``; the vocabulary comes from the tokenizer). source "local": a Hugging Face model
    folder at ``path`` (config.json + weights); the size fields are then ignored.
    """

    #: config: a fresh arch model from the sizes below; local: a Hugging Face model folder at path
    source: Literal["config", "local"] = "config"
    arch: Literal["llama"] = "llama"  #: architecture built with source config
    path: str = ""  #: source local: the model folder (config.json + weights); never downloaded, no remote code
    hidden_size: int = 64  #: source config: width of the model
    num_hidden_layers: int = 2  #: source config: transformer blocks
    num_attention_heads: int = 4  #: source config: attention heads (divides hidden_size)
    num_key_value_heads: int = 2  #: source config: key/value heads (divides num_attention_heads)
    intermediate_size: int = 128  #: source config: width of the MLP
    max_position_embeddings: int = 128  #: source config: longest sequence the positions cover
    tie_word_embeddings: bool = False  #: source config: share the input embedding and output head weights
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"  #: attention kernel passed to transformers
    lora: LoraSettings | None = None  #: LoRA adapters (peft): only they train; null: the whole model trains
    init_seed: int = 0  #: seed of the fresh weights (and, +1, of the LoRA adapters)

    def __post_init__(self) -> None:
        if self.source == "local" and not self.path:
            raise ValueError("path: required when source is 'local' (a Hugging Face model folder)")
        if self.source == "config" and self.path:
            raise ValueError(f"path: only used with source 'local', got {self.path!r} with source 'config'")
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "intermediate_size",
            "max_position_embeddings",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"num_attention_heads: must divide hidden_size {self.hidden_size}, got {self.num_attention_heads}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: must divide num_attention_heads {self.num_attention_heads}, "
                f"got {self.num_key_value_heads}"
            )


def _from_config(
    cfg: ModelConfig, vocab_size: int, pad_id: int | None, bos_id: int | None, eos_id: int | None
) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415 - heavy: imported when a model is built or loaded

    hf_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
    )
    hf_config._attn_implementation = cfg.attn_implementation
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return LlamaForCausalLM(hf_config).float()


def _from_local(cfg: ModelConfig, vocab_size: int, pad_id: int | None) -> nn.Module:
    from transformers import AutoModelForCausalLM  # noqa: PLC0415 - heavy: imported when a model is built or loaded

    path = Path(cfg.path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model.path: {path} is not a Hugging Face model folder (no config.json)")
    refuse_remote_code(path, "model.path")
    model = AutoModelForCausalLM.from_pretrained(
        path,
        local_files_only=True,
        dtype=torch.float32,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=False,
    )
    weight: torch.Tensor = model.get_input_embeddings().weight  # type: ignore[assignment]  # nn.Module.__getattr__ is untyped
    rows = int(weight.shape[0])
    if rows < vocab_size:
        raise ValueError(
            f"model.path: {path} has {rows} embedding rows, fewer than the tokenizer's "
            f"vocabulary of {vocab_size}; use the model's own tokenizer"
        )
    if model.config.pad_token_id is None and pad_id is not None:
        model.config.pad_token_id = pad_id
    return model


def build_model(
    cfg: ModelConfig, vocab_size: int, pad_id: int | None, bos_id: int | None, eos_id: int | None
) -> nn.Module:
    """A float32 Hugging Face causal LM (``LlamaForCausalLM`` for source "config"), with LoRA
    adapters if ``cfg.lora`` is set (then only the adapters require grad). Not yet sharded."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size: must be >= 1, got {vocab_size}")
    if cfg.source == "config":
        model = _from_config(cfg, vocab_size, pad_id, bos_id, eos_id)
    else:
        model = _from_local(cfg, vocab_size, pad_id)
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model  # noqa: PLC0415 - optional dependency (LoRA)

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,  # type: ignore[arg-type]  # peft annotates int; it scales by alpha / r as a float
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed + 1)
            try:
                model = get_peft_model(model, lora)
            except ValueError as err:
                raise ValueError(f"lora.target_modules: {err}") from err
    return model
