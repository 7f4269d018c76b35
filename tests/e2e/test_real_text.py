"""The real-text base-model builder at tiny size: it builds tokenizer, base model and stream, reuses the
cached folders on a second call (same content hash), and the base loads with ``from_pretrained``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from benchmarks.real_text import TINY, build
from optsel.pipeline.data.pysource import PySourceConfig

from support.pysource_tree import write_tree


@pytest.mark.slow
def test_tiny_base_build_is_cached_by_hash_and_loads(tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    tree = write_tree(tmp_path / "src")
    source = PySourceConfig(include_stdlib=False, roots=[str(tree)], target_prefixes=["tpkg"], target_fraction=0.3)
    cache = tmp_path / "cache"
    first = build(source, TINY, cache, tmp_path / "data")
    assert first["tokenizer_built"] and first["base_built"]
    assert set(first["kind_counts"]["train"]) == {"target", "corrupted", "distractor/pairs", "distractor/text"}
    summary = json.loads((Path(first["base"]) / "pretrain.json").read_text())
    assert summary["steps"] == TINY.tokens // (TINY.batch * TINY.seq_len)
    second = build(source, TINY, cache)
    assert not second["tokenizer_built"] and not second["base_built"]
    assert (second["tokenizer"], second["base"]) == (first["tokenizer"], first["base"])
    other = build(source, replace(TINY, hidden=48), cache)  # other settings: another folder
    assert other["base_built"] and other["base"] != first["base"] and other["tokenizer"] == first["tokenizer"]
    model = LlamaForCausalLM.from_pretrained(first["base"])
    tok = AutoTokenizer.from_pretrained(first["base"])
    assert model.config.vocab_size == len(tok) == TINY.vocab_size
    assert model.config.hidden_size == TINY.hidden and model.config.max_position_embeddings >= TINY.max_seq_len
    report = json.loads((tmp_path / "data" / "prepare_report.json").read_text())
    assert report["tokenizer"]["vocab_size"] == len(tok) and report["source"] == "pysource"
