"""The pysource corpus: what the walk reads and skips, the kinds and their mix, the mismatched pairs, the
train/val disjointness check, and ``optsel prepare`` with source pysource end to end."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import pytest

from optsel.config_loader import ConfigError, from_mapping
from optsel.pipeline.data.prepare import PrepareConfig, prepare
from optsel.pipeline.data.pysource import (
    PySample,
    PySourceConfig,
    SplitOverlap,
    check_disjoint,
    chunks,
    collect,
    looks_english,
    mix,
)
from optsel.pipeline.data.tokenizer import TokenizerConfig

from support.common import read_split
from support.pysource_tree import LICENSE, SECRET, doc, write_tree

KINDS = {"target", "corrupted", "distractor/pairs", "distractor/text"}


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "src")


def config(tree, **kw) -> PySourceConfig:
    base = dict(
        include_stdlib=False, roots=[str(tree)], target_prefixes=["tpkg"], target_fraction=0.3, corrupted_fraction=0.1
    )
    return PySourceConfig(**{**base, **kw})


def test_walk_reads_pairs_and_text_and_counts_what_it_skips(tree):
    corpus = collect(config(tree))
    stats = corpus.stats
    assert stats.skipped_unparsable == 1  # broken.py
    assert stats.skipped_undecodable == 1  # latin.py
    assert stats.skipped_symlink_outside == 1  # escape.py (the linked/ folder is never walked)
    assert stats.skipped_private == 2  # the two _hidden functions
    assert len(corpus.targets) == 31 and len(corpus.others) == 80  # 30 functions + the method; 80
    assert all(p.module == "tpkg.core" for p in corpus.targets)
    assert all(p.module == "other.util" for p in corpus.others)
    texts = [t.text for t in corpus.texts]
    assert LICENSE in texts
    assert any(t.startswith("The target module") for t in texts)  # a module docstring
    everything = texts + [p.doc for p in corpus.targets + corpus.others]
    assert not any(SECRET in t for t in everything)  # neither the file symlink nor the folder one
    assert not any("test" == p.module.split(".")[0] for p in corpus.others)  # tests/ excluded


def test_prompt_is_the_signature_under_its_module_and_class(tree):
    corpus = collect(config(tree))
    method = next(p for p in corpus.targets if p.qualname == "Klass.method")
    assert method.prompt == '# module tpkg.core\nclass Klass:\n    def method(self, x: int=1) -> str:\n        """'
    assert method.doc.endswith("This is a method of the class.")
    func = next(p for p in corpus.targets if p.qualname == "target_wa")
    assert func.prompt == '# module tpkg.core\ndef target_wa(value, limit: int=3) -> str:\n    """'


def test_filters_length_language_and_dedup(tree):
    base = collect(config(tree)).stats
    kept = doc(1000, "other")  # other.util's first docstring; more.py is walked first and keeps its copy
    (tree / "other" / "more.py").write_text(
        '"""Extra functions."""\n'
        f'def copy_one():\n    """{kept}"""\n'
        f'def near_copy():\n    """{kept.upper().replace(" ", "  ")}!"""\n'
        'def short():\n    """Too short."""\n'
        'def german():\n    """Gibt den Wert des Objekts zur\u00fcck und pr\u00fcft, ob er f\u00fcr diesen Aufruf '
        'g\u00fcltig ist."""\n'
    )
    stats = collect(config(tree)).stats
    assert stats.skipped_duplicate - base.skipped_duplicate == 1  # util's copy of copy_one
    assert stats.skipped_near_duplicate - base.skipped_near_duplicate == 1
    assert stats.skipped_short - base.skipped_short == 2  # short() and the module docstring
    assert stats.skipped_language - base.skipped_language == 1
    cfg = PySourceConfig(include_stdlib=False, roots=["x"])
    assert looks_english("Return the value of the object when it is set.", cfg)
    assert not looks_english("if (x[0] != y[1]) { z += 2 * w; } // 0x1f, 0x2e", cfg)  # few letters
    assert not looks_english("Zlib CRC32 checksum PNG JPEG GIF TIFF BMP ICO WEBP", cfg)  # no stop words
    assert not looks_english("\u8fd4\u56de\u5bf9\u8c61\u7684\u503c the value of it", cfg)  # not ASCII-mostly
    assert all(len(c) <= 100 for c in chunks(LICENSE + "\n\n" + LICENSE, 100))


def test_mix_kinds_fractions_and_determinism(tree):
    cfg = config(tree)
    corpus = collect(cfg)
    train, val = mix(corpus, cfg, seed=0)
    counts = Counter(s.kind for s in train)
    assert set(counts) == KINDS
    assert {s.kind for s in val} == {"target"} and len(val) == round(cfg.val_fraction * 31)
    assert counts["target"] / len(train) == pytest.approx(cfg.target_fraction, abs=0.06)
    assert counts["corrupted"] / len(train) == pytest.approx(cfg.corrupted_fraction, abs=0.04)
    assert all(s.prompt == "" for s in train if s.kind == "distractor/text")
    assert mix(collect(cfg), cfg, seed=0) == (train, val)
    small, _ = mix(collect(cfg), replace(cfg, num_train=40), seed=0)
    assert len(small) == 40 and Counter(s.kind for s in small)["target"] == round(40 * cfg.target_fraction)
    assert mix(collect(cfg), cfg, seed=1) != (train, val)


def test_corrupted_pairs_hold_another_functions_docstring_of_similar_length(tree):
    cfg = config(tree)
    corpus = collect(cfg)
    by_prompt = {p.prompt: p for p in corpus.targets}
    by_doc = {p.doc: p for p in corpus.targets + corpus.others}
    train, _ = mix(corpus, cfg, seed=0)
    corrupted = [s for s in train if s.kind == "corrupted"]
    assert corrupted
    for s in corrupted:
        own, donor = by_prompt[s.prompt], by_doc[s.response]
        assert donor.key != own.key and s.response != own.doc
        assert 1 / cfg.length_ratio <= len(s.response) / len(own.doc) <= cfg.length_ratio


def test_no_function_or_docstring_in_both_splits_and_the_check_raises(tree):
    cfg = config(tree)
    train, val = mix(collect(cfg), cfg, seed=0)
    train_keys = {k for s in train for k in s.keys}
    assert not train_keys & {k for s in val for k in s.keys}
    assert not {s.response for s in train} & {s.response for s in val}
    check_disjoint(train, val)
    with pytest.raises(SplitOverlap, match="in both train and val"):
        check_disjoint([*train, replace(val[0], split="train")], val)
    same_doc = PySample(
        "train", "distractor/pairs", "# module x\ndef y():", val[0].response.upper(), "x.py:1", ("x:y",)
    )
    with pytest.raises(SplitOverlap, match="docstring"):
        check_disjoint([*train, same_doc], val)  # a near-duplicate (normalised) docstring


def test_config_is_strict_naming_the_key(tree):
    with pytest.raises(ConfigError, match="pysource.bogus"):
        from_mapping(PrepareConfig, {"out_dir": "x", "source": "pysource", "pysource": {"bogus": 1}})
    with pytest.raises(ConfigError, match="pysource.target_fraction"):
        from_mapping(PrepareConfig, {"out_dir": "x", "source": "pysource", "pysource": {"target_fraction": 1.5}})
    with pytest.raises(ConfigError, match="pysource.docstring"):
        from_mapping(PrepareConfig, {"out_dir": "x", "source": "pysource", "pysource": {"docstring": "all"}})


def test_prepare_pysource_writes_shards_whose_kinds_match(tree, tmp_path):
    out = tmp_path / "data"
    cfg = PrepareConfig(
        out_dir=str(out),
        source="pysource",
        pysource=config(tree),
        tokenizer=TokenizerConfig(kind="byte"),
        max_seq_len=256,
    )
    report = prepare(cfg)
    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["source_stats"]["skipped_unparsable"] == 1
    assert saved["source_stats"]["skipped_undecodable"] == 1
    assert saved["source_stats"]["skipped_symlink_outside"] == 1
    kinds = json.loads((out / "kinds.json").read_text())
    for split in ("train", "val"):
        rows = read_split(out / split)
        assert Counter(r["kind"] for r in rows) == Counter(report.kind_counts[split])
        assert all(kinds[r["kind"]] == r["kind_id"] for r in rows)
    assert set(report.kind_counts["train"]) == KINDS
    assert set(report.kind_counts["val"]) == {"target"}
    val_prompts = {r["prompt"] for r in read_split(out / "val")}
    train_clean = {r["prompt"] for r in read_split(out / "train") if r["kind"] in ("target", "corrupted")}
    assert val_prompts and not val_prompts & train_clean
