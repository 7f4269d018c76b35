"""A subword tokenizer with no download: a byte-level BPE trained on the non-target part of a corpus.

:func:`train_bpe` trains it with ``tokenizers`` (``vocab_size`` ~8k by default) and wraps it as a
transformers ``PreTrainedTokenizerFast`` with ``<pad>`` / ``<s>`` / ``</s>``, role tokens and a chat template
whose assistant content sits between ``{% generation %}`` marks (what ``records.chat_tokens`` reads for the
loss mask). :func:`save_bpe` writes it with ``save_pretrained``; prepare then uses it as
``tokenizer: {kind: pretrained, path: <folder>}`` (loaded offline, ``trust_remote_code`` off).

``python -m optsel.pipeline.data.bpe --out DIR [--vocab-size N] [--root PATH ...] [--no-stdlib]`` trains on
the ``pysource`` corpus outside the target family (:func:`non_target_texts`): the target functions'
text (val included) is never seen by the tokenizer.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from pathlib import Path

from optsel.pipeline.data.pysource import Corpus, PySourceConfig, collect
from optsel.pipeline.data.tokenizer import BOS, EOS, PAD, save_tokenizer

ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
#: each turn: its role token, a newline, the content, then EOS (assistant) or a newline; assistant content
#: and its EOS inside {% generation %} (the loss mask)
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' }}{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% elif message['role'] in ['system', 'developer'] %}{{ '<|system|>\\n' + message['content'] + '\\n' }}"
    "{% else %}{{ '<|user|>\\n' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
DEFAULT_VOCAB = 8192


def train_bpe(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB):
    """A byte-level BPE of ``vocab_size`` tokens (incl. 256 bytes, pad/bos/eos and the role tokens) trained
    on ``texts``, as a ``PreTrainedTokenizerFast`` with the chat template :data:`CHAT_TEMPLATE`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 - heavy: imported when a tokenizer is built
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 - heavy: imported when a model is built or loaded

    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    if vocab_size < 256 + len(specials):
        raise ValueError(f"vocab_size: must be >= {256 + len(specials)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_bpe(tok, out_dir: str | Path) -> Path:
    """``save_pretrained`` into ``out_dir`` (tokenizer.json, tokenizer_config.json with the chat template)."""
    return save_tokenizer(tok, out_dir)


def non_target_texts(corpus: Corpus) -> list[str]:
    """The texts of a pysource corpus outside the target family: every other function's prompt + docstring
    and every plain-text chunk (the target family's text, val included, is never among them)."""
    return [p.prompt + p.doc for p in corpus.others] + [t.text for t in corpus.texts]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m optsel.pipeline.data.bpe", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="tokenizer folder to write")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB)
    parser.add_argument("--root", action="append", default=[], help="an extra source tree (repeatable)")
    parser.add_argument("--no-stdlib", action="store_true", help="do not read the interpreter's stdlib")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    texts = non_target_texts(collect(PySourceConfig(include_stdlib=not args.no_stdlib, roots=args.root)))
    t1 = time.perf_counter()
    tok = train_bpe(texts, args.vocab_size)
    save_bpe(tok, args.out)
    print(
        f"bpe: {len(tok)} tokens from {len(texts)} texts ({sum(map(len, texts))} chars) -> {args.out} "
        f"(corpus {t1 - t0:.1f} s, training {time.perf_counter() - t1:.1f} s)"
    )


if __name__ == "__main__":
    main()
