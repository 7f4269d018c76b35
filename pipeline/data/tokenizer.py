"""Tokenizers that need no download: built locally with ``tokenizers``, saved as a HF fast tokenizer.

Kinds (``TokenizerConfig.kind``):
- ``byte``: a byte-level tokenizer, no training: ids 0..2 are ``<pad>``, ``<s>``, ``</s>``, then one
  token per byte (259 in all). Every UTF-8 text round-trips; a digit is one token (good for arithmetic).
- ``bpe``: a byte-level BPE trained on the prepare corpus up to ``vocab_size`` tokens.
- ``pretrained``: an existing Hugging Face tokenizer directory at ``path`` (a hub name only with
  ``local_files_only: false`` on a machine with network). A missing pad token falls back to EOS (logged).

Whatever the kind, :func:`build_tokenizer` returns a ``PreTrainedTokenizerFast``-compatible object with
pad/eos (and bos) set, and :func:`load_tokenizer` loads the saved directory with ``AutoTokenizer``.

A tokenizer comes with the data (``<data>/tokenizer/``), so it is untrusted: it is loaded with
``trust_remote_code=False``, and a folder whose config has an ``auto_map`` (transformers would import a
``.py`` file from it) is refused up front (:func:`refuse_remote_code`, also used for model folders).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from optsel.config_loader import ConfigError

log = logging.getLogger("optsel.tokenizer")

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


@dataclass(kw_only=True)
class TokenizerConfig:
    """How prepare gets its tokenizer (saved to ``<out_dir>/tokenizer``)."""

    #: byte: fixed byte-level; bpe: trained on the train records; pretrained: a saved HF tokenizer
    kind: Literal["byte", "bpe", "pretrained"] = "byte"
    path: str | None = None  #: kind=pretrained: a local HF tokenizer dir (or a hub name, see local_files_only)
    vocab_size: int = 512  #: kind=bpe: target vocabulary size incl. the 256 bytes and the special tokens
    add_bos: bool = False  #: prepend BOS to every sample's tokens
    local_files_only: bool = True  #: kind=pretrained: never reach a hub unless set to false

    def __post_init__(self) -> None:
        if self.kind == "pretrained" and not self.path:
            raise ValueError("path: required when kind is 'pretrained'")
        if self.kind != "pretrained" and self.path is not None:
            raise ValueError(f"path: only used with kind 'pretrained' (kind is {self.kind!r})")
        if self.kind == "bpe" and self.vocab_size < 259:
            raise ValueError(f"vocab_size: must be >= 259 (256 bytes + 3 special tokens), got {self.vocab_size}")


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415 - heavy: imported when a model is built or loaded

    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS)


def byte_tokenizer():
    """The fixed byte-level tokenizer: <pad>=0, <s>=1, </s>=2, then the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: PLC0415 - heavy: imported when a tokenizer is built

    vocab = {s: i for i, s in enumerate([PAD, BOS, EOS])}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return _wrap(tok)


def bpe_tokenizer(corpus: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on ``corpus`` (an iterable of texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: PLC0415 - heavy: imported when a tokenizer is built

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return _wrap(tok)


#: the files of a tokenizer or model folder in which transformers looks for ``auto_map`` (custom code)
CODE_CONFIGS = ("tokenizer_config.json", "config.json", "processor_config.json", "preprocessor_config.json")


def refuse_remote_code(folder: str | Path, key: str) -> None:
    """Refuse a tokenizer or model folder whose config has an ``auto_map`` entry (it points transformers
    at Python code, e.g. a ``.py`` file beside it): a ConfigError on ``key`` naming the file. optsel
    never runs code from a dataset or a model folder."""

    for name in CODE_CONFIGS:
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            config = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as err:
            raise ConfigError(key, f"{path} is not valid JSON ({err})") from err
        if isinstance(config, dict) and "auto_map" in config:
            raise ConfigError(
                key,
                f"{path} has an 'auto_map' entry, which would make transformers import Python "
                f"code from {path.parent}; optsel never runs code from a dataset or model folder "
                f"(trust_remote_code is off). Remove 'auto_map' or use a tokenizer/model class "
                f"that transformers ships",
            )


def load_tokenizer(path: str | Path, local_files_only: bool = True, key: str = "data.local"):
    """Load a saved HF tokenizer directory (no network by default, never custom code); pad falls back to EOS.

    Raises FileNotFoundError naming ``path`` when it is not a tokenizer directory, ConfigError on
    ``key`` when its config asks for custom code (``auto_map``), ValueError when the tokenizer has no
    EOS token (prepare appends EOS to every sample).
    """
    from transformers import AutoTokenizer  # noqa: PLC0415 - heavy: imported when a model is built or loaded

    p = Path(path)
    if local_files_only and not (p / "tokenizer_config.json").is_file() and not (p / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer at {p} (expected tokenizer.json / tokenizer_config.json)")
    if p.is_dir():
        refuse_remote_code(p, key)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=local_files_only, trust_remote_code=False)
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer at {path} has no EOS token")
    if tok.pad_token_id is None:
        log.warning("tokenizer at %s has no pad token; using EOS (%d) for padding", path, tok.eos_token_id)
        tok.pad_token = tok.eos_token
    return tok


def build_tokenizer(cfg: TokenizerConfig, corpus: Iterable[str] | None = None):
    """The tokenizer ``cfg`` asks for (``corpus`` is needed for kind=bpe)."""
    if cfg.kind == "byte":
        return byte_tokenizer()
    if cfg.kind == "bpe":
        if corpus is None:
            raise ValueError("kind: 'bpe' needs a corpus to train on")
        return bpe_tokenizer(corpus, cfg.vocab_size)
    assert cfg.path is not None
    if Path(cfg.path).exists() or cfg.local_files_only:
        return load_tokenizer(cfg.path, local_files_only=True, key="tokenizer.path")
    return load_tokenizer(cfg.path, local_files_only=False, key="tokenizer.path")  # hub name: needs network


def save_tokenizer(tok, out_dir: str | Path) -> Path:
    """``save_pretrained`` into ``out_dir`` (created); returns the directory."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def vocab_sha256(tok) -> str:
    """sha256 of the tokenizer's vocabulary (every token → id, added tokens included, as sorted JSON):
    the same for two saves of one tokenizer, whatever their file layout."""

    vocab = sorted(tok.get_vocab().items(), key=lambda kv: (kv[1], kv[0]))
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode("utf-8")).hexdigest()


def file_sha256(path: str | Path) -> str | None:
    """sha256 of a file's bytes (None when it is not there)."""

    p = Path(path)
    if not p.is_file():
        return None
    digest = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tokenizer_identity(tok, kind: str, folder: str | Path) -> dict[str, object]:
    """What prepare records of its tokenizer (``prepare_report.json`` → ``tokenizer``): the kind, the sha256
    of the saved ``<folder>/tokenizer.json``, the vocabulary's sha256 (:func:`vocab_sha256`), the vocab size
    (``len(tok)``, added tokens included) and the special ids (None where the tokenizer has none)."""
    return {
        "kind": kind,
        "tokenizer_json_sha256": file_sha256(Path(folder) / "tokenizer.json"),
        "vocab_sha256": vocab_sha256(tok),
        "vocab_size": len(tok),
        "pad_id": tok.pad_token_id,
        "bos_id": tok.bos_token_id,
        "eos_id": tok.eos_token_id,
    }
