"""The BPE tokenizer: trained on tiny text, saved, loaded through prepare's local-tokenizer path, and its
chat template renders with the {% generation %} marks the chat loss mask reads."""

from __future__ import annotations

import json

from optsel.pipeline.data.bpe import ROLE_TOKENS, non_target_texts, save_bpe, train_bpe
from optsel.pipeline.data.pysource import PySourceConfig, collect
from optsel.pipeline.data.records import Chat, chat_tokens, has_generation_marks
from optsel.pipeline.data.tokenizer import TokenizerConfig, build_tokenizer

from support.pysource_tree import write_tree

TEXT = [
    "Return the value of the given object and check that it is valid for this call.",
    "def formataddr(pair, charset='utf-8'):\n    Return a string suitable for an RFC 2822 From, To or Cc header.",
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software.",
] * 20


def test_train_save_load_round_trip_and_chat_template(tmp_path):
    tok = train_bpe(TEXT, vocab_size=400)
    assert len(tok) == 400
    folder = save_bpe(tok, tmp_path / "bpe")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert "auto_map" not in config
    loaded = build_tokenizer(TokenizerConfig(kind="pretrained", path=str(folder)))  # offline, no remote code
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token) == ("<pad>", "<s>", "</s>")
    assert len(loaded) == 400
    for text in [*TEXT[:3], "caf\u00e9 \u2013 unseen words: zyzzyva quokka"]:
        ids = loaded.encode(text, add_special_tokens=False)
        assert loaded.decode(ids) == text
    assert len(loaded.encode(TEXT[0], add_special_tokens=False)) < len(TEXT[0].encode()) // 3  # merges learnt
    assert has_generation_marks(loaded)
    chat = Chat([{"role": "user", "content": "What does it return?"}, {"role": "assistant", "content": "The value."}])
    ids, mask = chat_tokens(loaded, chat, "test")
    rendered = loaded.decode(ids)
    assert rendered == "<s><|user|>\nWhat does it return?\n<|assistant|>\nThe value.</s>"
    assert loaded.decode([i for i, m in zip(ids, mask) if m]) == "The value.</s>"
    for role in ROLE_TOKENS:
        assert len(loaded.encode(role, add_special_tokens=False)) == 1


def test_non_target_texts_leave_the_target_family_out(tmp_path):
    tree = write_tree(tmp_path / "src")
    corpus = collect(PySourceConfig(include_stdlib=False, roots=[str(tree)], target_prefixes=["tpkg"]))
    texts = non_target_texts(corpus)
    assert len(texts) == len(corpus.others) + len(corpus.texts)
    joined = "\n".join(texts)
    assert not any(p.doc in joined or p.prompt in joined for p in corpus.targets)
