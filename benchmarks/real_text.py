"""Real-text evidence, the inputs: a BPE tokenizer, a pre-trained base Llama and the ``pysource`` stream.

``python -m benchmarks.real_text [--tiny] [--data DIR] [--cache DIR] [--root PATH ...] [--no-stdlib]``:

1. the corpus: :func:`optsel.pipeline.data.pysource.collect` over the stdlib (and ``--root`` trees);
2. the tokenizer: a byte-level BPE (:mod:`optsel.pipeline.data.bpe`) trained on the non-target part;
3. the base model: a Llama (``transformers.LlamaConfig``; default hidden 384, 6 layers, 6 heads,
   intermediate 1024, tied embeddings: ~14M parameters with the 8k vocabulary) pre-trained from scratch
   with AdamW on the non-target text (other packages' pairs, licences, READMEs, module docstrings) packed
   into ``seq_len``-token sequences, for a fixed token budget (default sized for ~30 min on 2 cores);
4. the stream: ``optsel prepare`` with source ``pysource`` and that tokenizer into ``--data``.

Tokenizer and model are cached under ``--cache`` (default ``.cache/real_text/``, git-ignored) in folders
named by the sha256 of what they are made from (the corpus's texts, the tokenizer's vocabulary, the
settings): a rerun with the same inputs reuses them. ``--tiny`` sizes everything for tests (seconds).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from optsel.pipeline.data.bpe import non_target_texts, save_bpe, train_bpe
from optsel.pipeline.data.pysource import Corpus, PySourceConfig, collect, exact_hash
from optsel.pipeline.data.tokenizer import TokenizerConfig, load_tokenizer, vocab_sha256

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / ".cache" / "real_text"
DEFAULT_DATA = REPO / "data" / "real_text"


@dataclass(frozen=True)
class BaseSettings:
    """Tokenizer, model and pre-training sizes (all part of the cache key)."""

    vocab_size: int = 8192
    hidden: int = 384
    layers: int = 6
    heads: int = 6
    intermediate: int = 1024
    max_positions: int = 1024
    seq_len: int = 256  #: tokens per pre-training sequence
    batch: int = 8  #: sequences per step
    tokens: int = 400_000  #: pre-training token budget (~30 min at the ~220 tokens/s of 2 busy cores)
    lr: float = 1e-3  #: AdamW peak learning rate (linear warm-up over 5 % of the steps, cosine to 10 %)
    weight_decay: float = 0.1
    seed: int = 0
    max_seq_len: int = 512  #: the prepared stream's max_seq_len


TINY = BaseSettings(
    vocab_size=320,
    hidden=32,
    layers=2,
    heads=2,
    intermediate=64,
    max_positions=256,
    seq_len=64,
    batch=4,
    tokens=4 * 64 * 6,
    max_seq_len=128,
)


def corpus_digest(corpus: Corpus) -> str:
    """sha256 over the corpus's records (target, other and text pools, in walk order)."""
    h = hashlib.sha256()
    for pool in (corpus.targets, corpus.others):
        for p in pool:
            h.update(f"{p.key}\0{exact_hash(p.prompt)}\0{exact_hash(p.doc)}\n".encode())
    for t in corpus.texts:
        h.update(f"text\0{exact_hash(t.text)}\n".encode())
    return h.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _install(tmp: Path, final: Path) -> None:
    """Move a finished folder into place (another process may have made it meanwhile: keep theirs)."""
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise


def build_tokenizer_folder(corpus: Corpus, settings: BaseSettings, cache: Path) -> tuple[Path, bool]:
    """(folder, built now?) of the BPE for this corpus and vocab size, cached by their hash."""
    folder = cache / f"tokenizer-{_key('bpe', corpus_digest(corpus), settings.vocab_size)}"
    if (folder / "tokenizer.json").is_file():
        return folder, False
    tok = train_bpe(non_target_texts(corpus), settings.vocab_size)
    tmp = cache / f".{folder.name}.{os.getpid()}"
    save_bpe(tok, tmp)
    _install(tmp, folder)
    return folder, True


def pretraining_blocks(texts: list[str], tok, seq_len: int) -> list[list[int]]:
    """The texts tokenized, each followed by EOS, concatenated and cut into [seq_len]-token blocks."""
    stream: list[int] = []
    for text in texts:
        stream += tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    return [stream[i : i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]


def new_llama(settings: BaseSettings, tok):
    """A freshly initialised ``LlamaForCausalLM`` of ``settings``' size with ``tok``'s vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(settings.seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=settings.hidden,
        num_hidden_layers=settings.layers,
        num_attention_heads=settings.heads,
        num_key_value_heads=settings.heads,
        intermediate_size=settings.intermediate,
        max_position_embeddings=settings.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return LlamaForCausalLM(config)


def pretrain(model, blocks: list[list[int]], settings: BaseSettings) -> list[float]:
    """AdamW on ``blocks`` (shuffled each epoch) for ``settings.tokens`` tokens; returns the step losses."""
    import torch

    steps = max(1, settings.tokens // (settings.batch * settings.seq_len))
    warmup = max(1, steps // 20)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(settings.seed)
    order: list[int] = []
    losses = []
    model.train()
    for _ in range(steps):
        batch = []
        for _ in range(settings.batch):
            if not order:
                order = list(range(len(blocks)))
                rng.shuffle(order)
            batch.append(blocks[order.pop()])
        ids = torch.tensor(batch, dtype=torch.long)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses


def build_base(corpus: Corpus, tokenizer_dir: Path, settings: BaseSettings, cache: Path) -> tuple[Path, bool]:
    """(folder, built now?) of the pre-trained base, cached by (corpus, tokenizer vocabulary, settings)."""
    tok = load_tokenizer(tokenizer_dir, key="tokenizer")
    folder = cache / f"base-{_key('llama', corpus_digest(corpus), vocab_sha256(tok), asdict(settings))}"
    if (folder / "config.json").is_file():
        return folder, False
    blocks = pretraining_blocks(non_target_texts(corpus), tok, settings.seq_len)
    if not blocks:
        raise ValueError(f"the corpus's non-target text is shorter than one {settings.seq_len}-token sequence")
    model = new_llama(settings, tok)
    t0 = time.perf_counter()
    losses = pretrain(model, blocks, settings)
    tmp = cache / f".{folder.name}.{os.getpid()}"
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    n = len(losses)
    summary = {
        "settings": asdict(settings),
        "parameters": sum(p.numel() for p in model.parameters()),
        "blocks": len(blocks),
        "steps": n,
        "seconds": time.perf_counter() - t0,
        "loss_first": sum(losses[: max(1, n // 10)]) / max(1, n // 10),
        "loss_last": sum(losses[-max(1, n // 10) :]) / max(1, n // 10),
    }
    (tmp / "pretrain.json").write_text(json.dumps(summary, indent=2) + "\n")
    _install(tmp, folder)
    return folder, True


def prepare_stream(pysource: PySourceConfig, tokenizer_dir: Path, data_dir: Path, settings: BaseSettings):
    """``optsel prepare`` with source pysource and the BPE into ``data_dir`` (replaced if present)."""
    from optsel.pipeline.data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(
        out_dir=str(data_dir),
        source="pysource",
        pysource=pysource,
        tokenizer=TokenizerConfig(kind="pretrained", path=str(tokenizer_dir)),
        max_seq_len=settings.max_seq_len,
        seed=settings.seed,
        overwrite=True,
    )
    return prepare(cfg)


def build(
    pysource: PySourceConfig, settings: BaseSettings, cache: Path, data_dir: Path | None = None
) -> dict[str, object]:
    """Corpus, tokenizer, base model (and the stream when ``data_dir`` is given); what was built, how long."""
    cache.mkdir(parents=True, exist_ok=True)
    out: dict[str, object] = {}
    t0 = time.perf_counter()
    corpus = collect(pysource)
    out["corpus_s"] = time.perf_counter() - t0
    out["pools"] = dict(corpus.stats.pools)
    t0 = time.perf_counter()
    tok_dir, out["tokenizer_built"] = build_tokenizer_folder(corpus, settings, cache)
    out["tokenizer"], out["tokenizer_s"] = str(tok_dir), time.perf_counter() - t0
    t0 = time.perf_counter()
    base_dir, out["base_built"] = build_base(corpus, tok_dir, settings, cache)
    out["base"], out["base_s"] = str(base_dir), time.perf_counter() - t0
    if data_dir is not None:
        t0 = time.perf_counter()
        report = prepare_stream(pysource, tok_dir, data_dir, settings)
        out["data"], out["data_s"] = str(data_dir), time.perf_counter() - t0
        out["kind_counts"] = report.kind_counts
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_text", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="test sizes (seconds)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="tokenizer and base-model cache")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the prepared stream's folder")
    parser.add_argument("--no-data", action="store_true", help="build tokenizer and base only")
    parser.add_argument("--root", action="append", default=[], help="an extra source tree (repeatable)")
    parser.add_argument("--no-stdlib", action="store_true", help="do not read the interpreter's stdlib")
    parser.add_argument("--tokens", type=int, default=None, help="override the pre-training token budget")
    args = parser.parse_args(argv)
    settings = TINY if args.tiny else BaseSettings()
    if args.tokens is not None:
        settings = replace(settings, tokens=args.tokens)
    pysource = PySourceConfig(include_stdlib=not args.no_stdlib, roots=args.root)
    t0 = time.perf_counter()
    out = build(pysource, settings, args.cache, None if args.no_data else args.data)
    for key, value in out.items():
        print(f"{key}: {value:.1f}" if isinstance(value, float) else f"{key}: {value}")
    print(f"real_text: done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
