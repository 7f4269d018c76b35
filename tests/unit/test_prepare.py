"""prepare: synthetic / JSONL / Parquet / datasets sources → real MDS shards, and every bad-input case."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from optsel.config_loader import ConfigError, from_mapping
from optsel.pipeline.data.prepare import PrepareConfig, prepare
from optsel.pipeline.data.records import BadRecord, HFSourceConfig, TemplateConfig
from optsel.pipeline.data.synthetic import SyntheticConfig, generate
from optsel.pipeline.data.tokenizer import TokenizerConfig, build_tokenizer, load_tokenizer, save_tokenizer

from support.common import read_split

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def small_synthetic(out: Path, **kw) -> PrepareConfig:
    return PrepareConfig(
        out_dir=str(out), synthetic=SyntheticConfig(num_train=200, num_val=40), max_seq_len=32, size_limit=2048, **kw
    )


def test_prepare_synthetic_writes_shards_kinds_and_report(tmp_path):
    out = tmp_path / "ds"
    report = prepare(small_synthetic(out))
    kinds = json.loads((out / "kinds.json").read_text())
    assert kinds == {
        "target": 0,
        "corrupted": 1,
        "distractor/reverse": 2,
        "distractor/sort": 3,
        "distractor/copy": 4,
        "distractor/count": 5,
    }
    assert report.num_shards["train"] > 1 and list((out / "train").glob("shard.*.mds.zstd"))
    assert json.loads((out / "prepare_report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    assert (report.num_train, report.num_val) == (200, 40)
    assert report.kind_counts["train"]["target"] == 80 and report.kind_counts["train"]["corrupted"] == 40
    assert sum(report.kind_counts["train"].values()) == 200 and report.kind_counts["val"] == {"target": 40}
    assert report.truncated == report.rejected_overlong == report.skipped_empty == report.skipped_bad == 0

    tok = load_tokenizer(out / "tokenizer")
    train, val = read_split(out / "train"), read_split(out / "val")
    assert sorted(r["sample_id"] for r in train + val) == list(range(240))
    seen = {}
    for row in train + val:
        tokens = row["tokens"]
        assert tokens.dtype == np.int32 and tokens[-1] == tok.eos_token_id and len(tokens) <= 32
        assert tok.decode(tokens[: row["prompt_len"]]) == row["prompt"]
        assert tok.decode(tokens[row["prompt_len"] : -1]) == row["answer"]
        assert kinds[row["kind"]] == row["kind_id"]
        seen[row["kind"]] = seen.get(row["kind"], 0) + 1
        if row["kind"] in ("target", "corrupted"):
            a, b = row["prompt"][:-1].split("+")
            assert (int(a) + int(b) == int(row["answer"])) == (row["kind"] == "target"), row
    assert seen["target"] == 120
    assert not {r["prompt"] for r in val} & {r["prompt"] for r in train}  # held-out prompts


def test_synthetic_is_deterministic_and_respects_mix():
    cfg = SyntheticConfig(num_train=100, num_val=10, target_fraction=0.5, corrupted_fraction=0.0, distractors=["copy"])
    assert generate(cfg, 3) == generate(cfg, 3) and generate(cfg, 3) != generate(cfg, 4)
    train, _ = generate(cfg, 3)
    assert sorted({s["kind"] for s in train}) == ["distractor/copy", "target"]
    assert sum(s["kind"] == "target" for s in train) == 50
    with pytest.raises(ValueError, match="distractors: unknown task 'nope'"):
        SyntheticConfig(distractors=["nope"])
    with pytest.raises(ConfigError, match="synthetic.corrupted_fraction"):
        from_mapping(PrepareConfig, {"out_dir": "x", "synthetic": {"target_fraction": 0.9, "corrupted_fraction": 0.2}})


def test_tokenizers_round_trip(tmp_path):
    text = "12+345=357 héllo ∑"
    byte = build_tokenizer(TokenizerConfig())
    ids = byte.encode(text, add_special_tokens=False)
    assert len(ids) == len(text.encode()) and byte.decode(ids) == text
    assert (byte.pad_token_id, byte.bos_token_id, byte.eos_token_id, len(byte)) == (0, 1, 2, 259)
    save_tokenizer(byte, tmp_path / "byte")
    loaded = load_tokenizer(tmp_path / "byte")
    assert loaded.encode(text, add_special_tokens=False) == ids and loaded.pad_token_id == 0

    bpe = build_tokenizer(TokenizerConfig(kind="bpe", vocab_size=300), ["abab abab 12+12=24"] * 50)
    ids = bpe.encode("abab 12+12=24", add_special_tokens=False)
    assert bpe.decode(ids) == "abab 12+12=24" and len(ids) < len("abab 12+12=24") and len(bpe) <= 300

    pre = build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "byte")))
    assert pre.encode(text, add_special_tokens=False) == byte.encode(text, add_special_tokens=False)
    with pytest.raises(FileNotFoundError, match="no tokenizer at"):
        build_tokenizer(TokenizerConfig(kind="pretrained", path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="path: required"):
        TokenizerConfig(kind="pretrained")


def test_refuses_to_overwrite_unless_asked(tmp_path):
    out = tmp_path / "ds"
    prepare(small_synthetic(out))
    (out / "keep.txt").write_text("user file")
    with pytest.raises(FileExistsError, match="not empty; set overwrite: true"):
        prepare(small_synthetic(out))
    report = prepare(small_synthetic(out, overwrite=True, seed=1))
    assert report.num_train == 200 and (out / "keep.txt").read_text() == "user file"


def write_jsonl(path: Path, lines: list) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


QA = TemplateConfig(prompt="Q: {question} A:", response=" {answer}", kind_field="source")


def test_jsonl_source_with_kinds_and_val_fraction(tmp_path):
    report = prepare(
        PrepareConfig(
            out_dir=str(tmp_path / "ds"),
            source="jsonl",
            files=[str(FIXTURES / "qa.jsonl")],
            template=QA,
            val_fraction=0.2,
        )
    )
    assert report.records_read == 40 and report.num_train + report.num_val == 40
    assert report.kind_counts["val"] == {"target": 5}  # 20% of the 25 targets, nothing else
    assert report.kind_counts["train"] == {"target": 20, "corrupted": 5, "distractor/reverse": 10}
    assert json.loads((tmp_path / "ds" / "kinds.json").read_text()) == {
        "target": 0,
        "corrupted": 1,
        "distractor/reverse": 2,
    }
    rows = read_split(tmp_path / "ds" / "train")
    first = json.loads((FIXTURES / "qa.jsonl").read_text().splitlines()[rows[0]["sample_id"]])
    assert rows[0]["prompt"] == f"Q: {first['question']} A:" and rows[0]["answer"] == f" {first['answer']}"


def test_parquet_source_with_val_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    train = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(30)]
    pq.write_table(pa.Table.from_pylist(train), tmp_path / "train.parquet")
    pq.write_table(pa.Table.from_pylist(train[:6]), tmp_path / "val.parquet")
    report = prepare(
        PrepareConfig(
            out_dir=str(tmp_path / "ds"),
            source="parquet",
            files=[str(tmp_path / "train.parquet")],
            val_files=[str(tmp_path / "val.parquet")],
        )
    )
    assert (report.num_train, report.num_val) == (30, 6)
    assert [r["answer"] for r in read_split(tmp_path / "ds" / "val")] == [str(i + 1) for i in range(6)]
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="bad.parquet: not a readable Parquet file"):
        prepare(PrepareConfig(out_dir=str(tmp_path / "ds2"), source="parquet", files=[str(tmp_path / "bad.parquet")]))


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    rows = {"prompt": [f"{i}+2=" for i in range(20)], "response": [str(i + 2) for i in range(20)]}
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(rows),
            "test": datasets.Dataset.from_dict({k: v[:4] for k, v in rows.items()}),
        }
    ).save_to_disk(str(tmp_path / "hf"))
    report = prepare(
        from_mapping(
            PrepareConfig,
            {
                "out_dir": str(tmp_path / "ds"),
                "source": "hf",
                "hf": {"path": str(tmp_path / "hf"), "val_split": "test"},
            },
        )
    )
    assert (report.num_train, report.num_val) == (20, 4)
    with pytest.raises(FileNotFoundError, match="hf dataset path not found"):
        prepare(
            PrepareConfig(out_dir=str(tmp_path / "ds2"), source="hf", hf=HFSourceConfig(path=str(tmp_path / "nope")))
        )


def jsonl_cfg(tmp_path, name: str, files: list[str], **kw) -> PrepareConfig:
    return PrepareConfig(out_dir=str(tmp_path / name), source="jsonl", files=files, val_fraction=0.0, **kw)


def test_bad_inputs_error_naming_file_and_line(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"input file not found: .*missing.jsonl \(files\[1\]\)"):
        prepare(jsonl_cfg(tmp_path, "a", [str(FIXTURES / "qa.jsonl"), str(tmp_path / "missing.jsonl")]))
    good = {"prompt": "1+1=", "response": "2"}
    cases = [
        (b"\xff\xfe not utf-8\n", r"bad.jsonl:2: not valid UTF-8 \(byte 0xff"),
        (b"{not json}\n", r"bad.jsonl:2: invalid JSON"),
        (b"[1, 2]\n", r"bad.jsonl:2: expected a JSON object, got list"),
        ({"prompt": "1+1="}, r"bad.jsonl:2: missing field 'response'"),
        ({"prompt": ["1", "+"], "response": "2"}, r"bad.jsonl:2: field 'prompt' has type list"),
        ({"prompt": None, "response": "2"}, r"bad.jsonl:2: field 'prompt' has type NoneType"),
    ]
    for i, (line, message) in enumerate(cases):
        path = write_jsonl(tmp_path / "bad.jsonl", [good, line])
        with pytest.raises(BadRecord, match=message):
            prepare(jsonl_cfg(tmp_path, f"case{i}", [str(path)]))
    path = write_jsonl(tmp_path / "kind.jsonl", [{"prompt": "a", "response": "b", "k": "noise"}])
    with pytest.raises(BadRecord, match=r"kind.jsonl:1: kind field 'k' is 'noise'"):
        prepare(jsonl_cfg(tmp_path, "kind", [str(path)], template=TemplateConfig(kind_field="k")))


def test_bad_records_skipped_and_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"prompt": "1+1=", "response": "2"},
            b"\xff broken\n",
            {"prompt": "1+2="},
            b"\n",
            {"prompt": "2+2=", "response": "  "},  # empty response
            {"prompt": "1+", "response": "9" * 100},  # over-long
            {"prompt": "3+3=", "response": 6},  # a number renders fine
        ],
    )
    report = prepare(jsonl_cfg(tmp_path, "skip", [str(path)], on_bad_record="skip", max_seq_len=16))
    assert (report.records_read, report.blank_lines, report.skipped_bad, report.skipped_empty) == (6, 1, 2, 1)
    assert (report.truncated, report.rejected_overlong, report.num_train) == (1, 0, 3)
    assert any("mixed.jsonl:2: not valid UTF-8" in m for m in report.bad_examples)
    rows = read_split(tmp_path / "skip" / "train")
    assert max(len(r["tokens"]) for r in rows) == 16 and [r["sample_id"] for r in rows] == [0, 5, 6]

    rejected = prepare(
        jsonl_cfg(tmp_path, "reject", [str(path)], on_bad_record="skip", max_seq_len=16, overlong="reject")
    )
    assert (rejected.truncated, rejected.rejected_overlong, rejected.num_train) == (0, 1, 2)
    with pytest.raises(ValueError, match="no train samples were written"):
        prepare(
            jsonl_cfg(tmp_path, "none", [str(write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": ""}]))])
        )
