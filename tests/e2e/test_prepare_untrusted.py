"""prepare on hostile input: a huge record is rejected unread (byte cap, never parsed or tokenized), lone
surrogates / NaN / Infinity / duplicate keys are named bad records with file:line, a failed prepare leaves
out_dir exactly as it was (overwrite moves the old dataset aside, never deletes it), and what prepare
writes is strict JSON.

Everything runs the real ``prepare`` (and once the real ``optsel prepare`` CLI) on real files; no mocks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from optsel.config_loader import ConfigError, from_mapping
from optsel.pipeline.data.prepare import PrepareConfig, prepare
from optsel.pipeline.data.records import BadRecord, TemplateConfig

from support.common import REPO

GOOD = [{"prompt": f"{i}+1=", "response": str(i + 1)} for i in range(12)]


def write_jsonl(path: Path, lines: list) -> Path:
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def jsonl_cfg(out: Path, files: list[Path], **kw) -> PrepareConfig:
    return PrepareConfig(out_dir=str(out), source="jsonl", files=[str(f) for f in files], val_fraction=0.0, **kw)


def with_line(path: Path, line, at: int = 6) -> Path:
    """GOOD with ``line`` inserted so that it is line ``at`` of the file."""
    return write_jsonl(path, GOOD[: at - 1] + [line] + GOOD[at - 1 :])


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def siblings(folder: Path, marker: str) -> list[str]:
    return sorted(p.name for p in folder.parent.iterdir() if marker in p.name)


# -- finding 7: a huge record is rejected by its byte count, before parsing and tokenizing ----------------
def test_huge_record_rejected_unread_with_file_and_line(tmp_path):
    huge = b'{"prompt": "' + b"1" * 20_000_000 + b'", "response": "2"}\n'  # ~20 MB, one line
    path = write_jsonl(tmp_path / "big.jsonl", GOOD[:5] + [huge] + GOOD[5:7] + [b"{broken\n"] + GOOD[7:])
    prepare(jsonl_cfg(tmp_path / "warm", [write_jsonl(tmp_path / "w.jsonl", GOOD)]))  # imports done before tracing

    tracemalloc.start()
    try:
        report = prepare(jsonl_cfg(tmp_path / "ds", [path], on_bad_record="skip"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.max_record_bytes == 1 << 20  # default: max(1 MiB, 64 * max_seq_len=64)
    assert report.rejected_oversize == 1 and report.rejected_overlong == 0 and report.truncated == 0
    assert (
        f"{path}:6: {len(huge) - 1} bytes > max_record_bytes=1048576 (rejected before parsing and "
        f"tokenizing)" in report.bad_examples
    )
    assert f"{path}:9: invalid JSON" in " ".join(report.bad_examples)  # line numbers go on after the skip
    assert (report.records_read, report.num_train, report.skipped_bad) == (14, 12, 1)
    # the 20 MB line was never held whole in memory (a parse or a tokenization needs it as bytes and str)
    assert peak < 8_000_000, f"traced peak {peak / 1e6:.1f} MB during prepare"
    saved = json.loads((tmp_path / "ds" / "prepare_report.json").read_text())
    assert saved["rejected_oversize"] == 1 and saved["max_record_bytes"] == 1 << 20

    # a huge record is a counted rejection even with on_bad_record=error (it is never parsed)
    only_huge = write_jsonl(tmp_path / "b2.jsonl", GOOD[:3] + [huge])
    assert prepare(jsonl_cfg(tmp_path / "ds2", [only_huge])).rejected_oversize == 1


def test_byte_cap_boundary_rendered_size_and_key_validation(tmp_path):
    base = {"prompt": "1+1=", "response": "2"}
    n = len(json.dumps(base))
    pad = {"prompt": "1+1=", "response": "2", "x": ""}
    at_cap = dict(pad, x="a" * (100 - len(json.dumps(pad))))
    over = dict(pad, x="a" * (101 - len(json.dumps(pad))))
    assert len(json.dumps(at_cap)) == 100 and len(json.dumps(over)) == 101 and n < 100
    path = write_jsonl(tmp_path / "edge.jsonl", [base, at_cap, over, base])
    report = prepare(jsonl_cfg(tmp_path / "ds", [path], max_record_bytes=100))
    assert (report.num_train, report.rejected_oversize) == (3, 1)
    assert report.bad_examples == [
        f"{path}:3: 101 bytes > max_record_bytes=100 (rejected before parsing and tokenizing)"
    ]

    # a template that repeats a field: the rendered text is capped too, before tokenizing
    twice = TemplateConfig(prompt="{prompt}{prompt}{prompt}", response="{response}")
    rec = json.dumps({"prompt": "é" * 30, "response": "2"}, ensure_ascii=False).encode() + b"\n"
    assert len(rec) < 150  # the line fits; its rendered text is 3 * 60 + 1 UTF-8 bytes
    report = prepare(
        jsonl_cfg(
            tmp_path / "ds2", [write_jsonl(tmp_path / "t.jsonl", [base, rec])], template=twice, max_record_bytes=150
        )
    )
    assert (report.num_train, report.rejected_oversize) == (1, 1)
    assert report.bad_examples[0].endswith(
        "t.jsonl:2: its rendered prompt + response > max_record_bytes=150 (rejected before tokenizing)"
    )

    # parquet has no lines: its records are capped on the rendered text
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "1+1=", "response": "2"}, {"prompt": "9" * 3_000_000, "response": "1"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "big.parquet")
    report = prepare(
        PrepareConfig(
            out_dir=str(tmp_path / "pq"), source="parquet", val_fraction=0.0, files=[str(tmp_path / "big.parquet")]
        )
    )
    assert (report.num_train, report.rejected_oversize) == (1, 1)
    assert report.bad_examples[0].startswith(f"{tmp_path / 'big.parquet'} row 2: its rendered prompt")

    with pytest.raises(ValueError, match="max_record_bytes: must be >= 1"):
        jsonl_cfg(tmp_path / "x", [path], max_record_bytes=0)
    with pytest.raises(ConfigError, match="max_record_bytes"):
        from_mapping(PrepareConfig, {"out_dir": "x", "max_record_bytes": "big"})
    assert jsonl_cfg(tmp_path / "x", [path], max_seq_len=65536).max_record_bytes is None
    assert prepare(jsonl_cfg(tmp_path / "long", [path], max_seq_len=32768)).max_record_bytes == 64 * 32768


# -- finding 10a / 14: invalid Unicode, NaN / Infinity, duplicate keys: bad records with file:line -----------
SURROGATE = r"refused JSON: invalid Unicode: lone surrogate in "
REFUSED = [
    (b'{"prompt": "a\\ud800", "response": "b"}\n', SURROGATE + r"field 'prompt' \(\\ud800\)"),
    (b'{"prompt": "a", "response": "\\udc00x"}\n', SURROGATE + r"field 'response' \(\\udc00\)"),
    (b'{"prompt": "a", "response": "b", "meta": ["\\ud83d"]}\n', SURROGATE + r"field 'meta'"),
    (b'{"prompt": "a", "response": NaN}\n', r"refused JSON: NaN is not valid JSON"),
    (b'{"prompt": "a", "response": -Infinity}\n', r"refused JSON: -Infinity is not valid JSON"),
    (b'{"prompt": "a", "response": 1e400}\n', r"refused JSON: number 1e400 overflows a float"),
    (b'{"prompt": "a", "prompt": "b", "response": "c"}\n', r"refused JSON: duplicate key 'prompt'"),
    (b'{"prompt": "a", "response": "b", "m": {"k": 1, "k": 2}}\n', r"refused JSON: duplicate key 'k'"),
    (b'{"prompt": "a", "response": ' + b"1" * 5000 + b"}\n", r"refused JSON: bad number"),
    (b'{"prompt": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}\n", r"refused JSON: nested too deeply"),
]


@pytest.mark.parametrize(
    "line,message",
    REFUSED,
    ids=[
        "surrogate",
        "low-surrogate",
        "nested-surrogate",
        "nan",
        "-inf",
        "1e400",
        "dup-key",
        "nested-dup-key",
        "bigint",
        "deep",
    ],
)
def test_refused_json_is_a_bad_record_with_file_and_line(tmp_path, line, message):
    path = with_line(tmp_path / "bad.jsonl", line)
    with pytest.raises(BadRecord, match=r"bad.jsonl:6: " + message):
        prepare(jsonl_cfg(tmp_path / "err", [path]))
    assert not (tmp_path / "err").exists()
    report = prepare(jsonl_cfg(tmp_path / "skip", [path], on_bad_record="skip"))
    assert (report.skipped_bad, report.num_train) == (1, 12)
    assert report.bad_examples[0].startswith(f"{path}:6: ")


def test_valid_unicode_and_numbers_still_accepted(tmp_path):
    lines = [
        b'{"prompt": "smile \\ud83d\\ude00 caf\\u00e9 ", "response": "\xe2\x88\x91 ok"}\n',  # a real pair
        b'{"prompt": "x=", "response": 1.5e3}\n',
        b'{"prompt": "back\\\\ud800slash", "response": "y"}\n',
    ]
    report = prepare(jsonl_cfg(tmp_path / "ds", [write_jsonl(tmp_path / "u.jsonl", lines)]))
    assert (report.num_train, report.skipped_bad) == (3, 0)


def test_parquet_non_finite_number_is_a_bad_record(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "1+1=", "response": 2.0}, {"prompt": "x=", "response": float("nan")}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "nan.parquet")
    with pytest.raises(BadRecord, match=r"nan.parquet row 2: field 'response' is nan, expected a finite number"):
        prepare(PrepareConfig(out_dir=str(tmp_path / "pq"), source="parquet", files=[str(tmp_path / "nan.parquet")]))


def test_template_that_does_not_fit_a_record_names_it(tmp_path):
    numeric = TemplateConfig(prompt="{prompt}", response=" {response:d}")  # a format spec for numbers
    rows = [{"prompt": "a", "response": i} for i in range(4)]
    path = write_jsonl(tmp_path / "fmt.jsonl", rows[:2] + [{"prompt": "a", "response": "x"}] + rows[2:])
    with pytest.raises(BadRecord, match=r"fmt.jsonl:3: the template cannot render this record: Unknown format code"):
        prepare(jsonl_cfg(tmp_path / "err", [path], template=numeric))
    report = prepare(jsonl_cfg(tmp_path / "skip", [path], template=numeric, on_bad_record="skip"))
    assert (report.num_train, report.skipped_bad) == (4, 1) and report.bad_examples[0].startswith(f"{path}:3: ")


def test_cli_names_the_line_of_a_lone_surrogate(tmp_path):
    path = with_line(tmp_path / "bad.jsonl", b'{"prompt": "a\\ud800", "response": "b"}\n')
    cfg = tmp_path / "prep.yaml"
    cfg.write_text(f"out_dir: {tmp_path / 'ds'}\nsource: jsonl\nfiles: [{path}]\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "optsel.launch.cli", "prepare", str(cfg)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"optsel prepare: {path}:6: refused JSON: invalid Unicode: lone surrogate" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "ds").exists()


# -- finding 10b: a failed prepare leaves out_dir as it was; overwrite keeps the old dataset -------------
def test_failed_overwrite_leaves_the_old_dataset_whole(tmp_path):
    out = tmp_path / "ds"
    prepare(jsonl_cfg(out, [write_jsonl(tmp_path / "good.jsonl", GOOD)], size_limit=1024))
    (out / "keep.txt").write_text("user file")
    before = tree(out)
    assert {"kinds.json", "prepare_report.json", "train/index.json", "val/index.json"} <= set(before)

    many = [{"prompt": f"{i}*2=" + "z" * 40, "response": str(2 * i)} for i in range(200)]
    bad = write_jsonl(tmp_path / "bad.jsonl", many[:150] + [b"{not json\n"] + many[150:])  # shards flushed first
    with pytest.raises(BadRecord, match=r"bad.jsonl:151: invalid JSON"):
        prepare(jsonl_cfg(out, [bad], size_limit=1024, overwrite=True))
    assert tree(out) == before  # kinds.json, prepare_report.json, index.json, shards: byte-identical
    assert siblings(out, ".partial-") == [] and siblings(out, ".replaced-") == []

    # a successful overwrite moves the old outputs aside (kept, named in the report), leaves keep.txt
    report = prepare(jsonl_cfg(out, [write_jsonl(tmp_path / "many.jsonl", many)], size_limit=1024, overwrite=True))
    assert report.replaced is not None and siblings(out, ".replaced-") == [Path(report.replaced).name]
    assert Path(report.replaced).parent == out.resolve().parent
    kept = tree(Path(report.replaced))
    assert kept == {k: v for k, v in before.items() if k != "keep.txt"}
    assert (out / "keep.txt").read_text() == "user file" and report.num_train == 200
    assert json.loads((out / "prepare_report.json").read_text())["replaced"] == report.replaced
    assert siblings(out, ".partial-") == []


def test_failed_fresh_prepare_leaves_no_out_dir(tmp_path):
    out = tmp_path / "new" / "ds"
    bad = with_line(tmp_path / "bad.jsonl", {"prompt": "1+1="})  # missing field: a hard error by default
    with pytest.raises(BadRecord, match=r"bad.jsonl:6: missing field 'response'"):
        prepare(jsonl_cfg(out, [bad], size_limit=1024))
    assert not out.exists() and not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="no train samples"):  # fails after writing everything: same
        prepare(jsonl_cfg(out, [write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a", "response": " "}])]))
    assert not (tmp_path / "new").exists()
    report = prepare(jsonl_cfg(out, [write_jsonl(tmp_path / "good.jsonl", GOOD)]))  # no overwrite needed
    assert report.num_train == 12 and report.replaced is None and (out / "prepare_report.json").is_file()
    assert siblings(out, ".partial-") == [] and siblings(out, ".replaced-") == []
    assert oct((out / "train").stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# -- finding 11: what prepare writes is strict JSON, whatever the input --------------------------------------
def strict_json(path: Path):
    """The JSON in ``path``, read as a strict reader would: UTF-8, no NaN / Infinity, no duplicate keys,
    every string valid Unicode (encodable as UTF-8)."""

    def no_constant(name):
        raise AssertionError(f"{path.name}: bare {name}")

    def pairs(items):
        keys = [k for k, _ in items]
        assert len(keys) == len(set(keys)), f"{path.name}: duplicate keys {keys}"
        return dict(items)

    value = json.loads(path.read_bytes().decode("utf-8"), parse_constant=no_constant, object_pairs_hook=pairs)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # UnicodeEncodeError on a lone surrogate
        elif isinstance(item, dict):
            stack += list(item) + list(item.values())
        elif isinstance(item, list):
            stack += item
    return value


def test_outputs_are_strict_json_even_from_hostile_input(tmp_path):
    name = os.fsdecode(b"in\xff.jsonl")  # a file name that is not UTF-8
    lines = [
        {"prompt": "a", "response": "b", "k": "target"},
        {"prompt": "a", "response": "b", "k": "y" * 100_000},
        b"\xff\xfe\n",
        {"prompt": "c", "response": "d", "k": "distractor/x"},
    ]
    path = write_jsonl(tmp_path / name, lines)
    report = prepare(jsonl_cfg(tmp_path / "ds", [path], on_bad_record="skip", template=TemplateConfig(kind_field="k")))
    assert report.skipped_bad == 2 and all(len(m) < 1000 for m in report.bad_examples)
    saved = strict_json(tmp_path / "ds" / "prepare_report.json")
    kinds = strict_json(tmp_path / "ds" / "kinds.json")
    assert kinds == saved["kinds"] == {"target": 0, "corrupted": 1, "distractor/x": 2}
    assert sorted(kinds.values()) == list(range(len(kinds)))
    assert all(isinstance(v, float) and math.isfinite(v) for v in (saved["mean_tokens"], saved["seconds"]))
    assert any(
        m.startswith(str(tmp_path) + "/in\\udcff.jsonl:2: kind field 'k' is 'yyy") for m in saved["bad_examples"]
    )
