"""Chat records (messages, prompt/completion) rendered with the tokenizer's own chat template, their loss
masks, and the tokenizer identity that prepare records and training checks (docs/data.md).

The tokenizer is a tiny byte-level BPE trained here with ``tokenizers`` and saved with
``PreTrainedTokenizerFast.save_pretrained``, once with a chat template that has ``{% generation %}``
marks and once without; the data goes through the real ``prepare`` into real MDS shards."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from optsel.config_loader import ConfigError
from optsel.pipeline.data.collate import collate
from optsel.pipeline.data.loaders import check_identity
from optsel.pipeline.data.prepare import ORIGINS, PrepareConfig, prepare
from optsel.pipeline.data.records import BadRecord, HFSourceConfig, TemplateConfig
from optsel.pipeline.data.tokenizer import TokenizerConfig, load_tokenizer

from support.common import REPO, read_split

SPECIALS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
_TURN = "<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
#: assistant content (and its <|end|>) between generation marks (the "\n" after a block tag is written as
#: an expression: transformers renders with trim_blocks, which drops a newline right after a tag)
GEN_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
    "{{ m['content'] }}<|end|>{% endgeneration %}{{ '\\n' }}{% else %}" + _TURN + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
#: the same rendering without marks: the prefix rule applies
PLAIN_TEMPLATE = (
    "{% for m in messages %}" + _TURN + "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WORDS = "the a cat dog sat ran on under mat box red blue one two three four five add sum is what".split()


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6))) + f" {rng.randint(0, 99)}"


def make_tokenizer(folder: Path, template: str | None) -> Path:
    """A byte-level BPE of ~400 tokens trained on generated sentences, saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([sentence(rng) for _ in range(400)], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("toks")
    return {
        "gen": make_tokenizer(root / "gen", GEN_TEMPLATE),
        "plain": make_tokenizer(root / "plain", PLAIN_TEMPLATE),
        "none": make_tokenizer(root / "none", None),
        # no marks, and the turn count up front: no rendering is a prefix of the next
        "counting": make_tokenizer(root / "counting", "{{ messages|length }}" + PLAIN_TEMPLATE),
    }


def conversations(n: int, seed: int = 1) -> list[list[dict[str, str]]]:
    """n conversations: some with a system turn, one to three user/assistant exchanges."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": sentence(rng)}] if i % 3 == 0 else []
        for _ in range(1 + i % 3):
            msgs += [{"role": "user", "content": sentence(rng)}, {"role": "assistant", "content": sentence(rng)}]
        out.append(msgs)
    return out


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def chat_cfg(out: Path, files: list[str], tok_dir: Path, fmt: str = "messages", **kw) -> PrepareConfig:
    return PrepareConfig(
        out_dir=str(out),
        source="jsonl",
        files=files,
        val_fraction=kw.pop("val_fraction", 0.25),
        template=TemplateConfig(format=fmt),
        tokenizer=TokenizerConfig(kind="pretrained", path=str(tok_dir)),
        max_seq_len=kw.pop("max_seq_len", 512),
        size_limit=2048,
        **kw,
    )


def expected(
    tok, messages: list[dict[str, str]], generation: bool, first_loss_turn: int = 0
) -> tuple[list[int], list[int]]:
    """Ids and loss mask computed piece by piece (independent of the template engine): the special tokens
    split the text, so each piece tokenizes alone. Loss: assistant content + <|end|> (with marks), and
    the "\\n" after it too (prefix rule: everything the turn adds after "<|assistant|>\\n")."""
    ids, mask = [], []
    for i, m in enumerate(messages):
        on = int(m["role"] == "assistant" and i >= first_loss_turn)
        for piece, loss in (
            (f"<|{m['role']}|>", 0),
            ("\n", 0),
            (m["content"], on),
            ("<|end|>", on),
            ("\n", 0 if generation else on),
        ):
            piece_ids = tok.encode(piece, add_special_tokens=False)
            ids += piece_ids
            mask += [loss] * len(piece_ids)
    return ids, mask


def labels_of(row: dict) -> np.ndarray:
    return collate([row], pad_id=0)["labels"][0].numpy()


@pytest.mark.parametrize("which", ["gen", "plain"])
def test_messages_ids_are_the_templates_and_loss_is_on_assistant_turns(tmp_path, tokenizers_dir, which):
    convs = conversations(24)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in convs])
    if which == "gen":  # the CLI, as a user runs it
        config = tmp_path / "prepare.yaml"
        config.write_text(
            f"out_dir: {tmp_path / 'ds'}\nsource: jsonl\nfiles: [{path}]\nval_fraction: 0.25\n"
            f"template: {{format: messages}}\n"
            f"tokenizer: {{kind: pretrained, path: {tokenizers_dir[which]}}}\nmax_seq_len: 512\n"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        done = subprocess.run(
            [sys.executable, "-m", "optsel.launch.cli", "prepare", str(config)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        report = json.loads((tmp_path / "ds" / "prepare_report.json").read_text())
    else:
        report = prepare(chat_cfg(tmp_path / "ds", [path], tokenizers_dir[which])).to_dict()
    assert report["num_train"] + report["num_val"] == 24 and report["truncated"] == 0 and report["skipped_bad"] == 0
    assert report["tokenizer"]["kind"] == "pretrained" and report["tokenizer"]["vocab_size"] == 400
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer")
    origins = {o["sample_id"]: o for o in map(json.loads, (tmp_path / "ds" / ORIGINS).read_text().splitlines())}
    rows = read_split(tmp_path / "ds" / "train") + read_split(tmp_path / "ds" / "val")
    assert len(rows) == 24 and len(origins) == 24
    multi_turn = 0
    for row in rows:
        line = int(origins[int(row["sample_id"])]["origin"].rsplit(":", 1)[1])  # sample_id → file:line
        messages = convs[line - 1]
        ids = list(row["tokens"])
        assert ids == list(tok.apply_chat_template(messages)["input_ids"])
        want_ids, want_mask = expected(tok, messages, generation=which == "gen")
        assert ids == want_ids and list(row["loss_mask"]) == want_mask
        labels = labels_of(row)
        assert (labels == np.where(np.asarray(want_mask) == 1, ids, -100)).all()
        assert int(row["prompt_len"]) == want_mask.index(1)
        multi_turn += sum(m["role"] == "assistant" for m in messages) > 1
    assert multi_turn >= 12

    # the trainer's path: StreamingDataset (load_split) → the collated val batches carry the same labels
    from optsel.distributed import DistInfo
    from optsel.pipeline.data.config import DataConfig
    from optsel.pipeline.data.loaders import build_val_batches

    data = DataConfig(local=str(tmp_path / "ds"), cache_dir=str(tmp_path / "cache"), clean_stale_shm=False)
    batch = build_val_batches(data, batch_size=64, rank_info=DistInfo(rank=0, world_size=1, local_rank=0))[0]
    assert len(batch["sample_id"]) == report["num_val"] >= 4
    for ids, labels, keep, sample_id in zip(
        batch["input_ids"], batch["labels"], batch["attention_mask"], batch["sample_id"]
    ):
        line = int(origins[int(sample_id)]["origin"].rsplit(":", 1)[1])
        want_ids, want_mask = expected(tok, convs[line - 1], generation=which == "gen")
        n = int(keep.sum())
        assert ids[:n].tolist() == want_ids
        assert labels[:n].tolist() == [t if m else -100 for t, m in zip(want_ids, want_mask)]
        assert (labels[n:] == -100).all()


def test_prompt_completion_forms(tmp_path, tokenizers_dir):
    convs = conversations(12, seed=2)
    records = [{"prompt": c[:-1], "completion": c[-1:]} for c in convs]  # conversational
    path = write_jsonl(tmp_path / "pc.jsonl", records)
    prepare(chat_cfg(tmp_path / "ds", [path], tokenizers_dir["plain"], fmt="prompt_completion", val_fraction=0.0))
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer")
    for row in read_split(tmp_path / "ds" / "train"):
        messages = convs[int(row["sample_id"])]  # one record per line, no blank lines: sample_id = line - 1
        _, want_mask = expected(tok, messages, generation=False, first_loss_turn=len(messages) - 1)
        assert list(row["loss_mask"]) == want_mask  # earlier assistant turns of the prompt: no loss

    # with generation marks too, and the plain-string form with the byte tokenizer
    prepare(chat_cfg(tmp_path / "ds2", [path], tokenizers_dir["gen"], fmt="prompt_completion", val_fraction=0.0))
    for row in read_split(tmp_path / "ds2" / "train"):
        messages = convs[int(row["sample_id"])]
        assert list(row["loss_mask"]) == expected(tok, messages, True, first_loss_turn=len(messages) - 1)[1]
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "2+2=", "completion": "4"}] * 4)
    cfg = PrepareConfig(
        out_dir=str(tmp_path / "ds3"),
        source="jsonl",
        files=[plain],
        val_fraction=0.0,
        template=TemplateConfig(format="prompt_completion"),
        max_seq_len=16,
    )
    prepare(cfg)
    row = read_split(tmp_path / "ds3" / "train")[0]
    byte = load_tokenizer(tmp_path / "ds3" / "tokenizer")
    assert list(row["tokens"]) == (
        byte.encode("2+2=", add_special_tokens=False) + byte.encode("4", add_special_tokens=False) + [byte.eos_token_id]
    )
    assert list(row["loss_mask"]) == [0, 0, 0, 0, 1, 1] and int(row["prompt_len"]) == 4


BAD = [
    ({"messages": []}, "empty conversation"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "unknown role 'robot'"),
    (
        {"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]},
        r"messages\[0\]: content has type int",
    ),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, r"messages\[0\] has no 'content'"),
    ({"messages": "hello"}, "field 'messages' has type str"),
    ({"text": "no messages"}, "missing field 'messages'"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "x"},
            ]
        },
        "content has type list",
    ),
]


@pytest.mark.parametrize("record, message", BAD)
def test_bad_chat_records_name_file_and_line(tmp_path, tokenizers_dir, record, message):
    good = [{"messages": c} for c in conversations(4)]
    path = write_jsonl(tmp_path / "bad.jsonl", good + [record])
    with pytest.raises(BadRecord, match=rf"bad.jsonl:5: .*{message}"):
        prepare(chat_cfg(tmp_path / "ds", [path], tokenizers_dir["gen"]))
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob("ds.partial-*"))


def test_prompt_completion_bad_records_and_skip(tmp_path, tokenizers_dir):
    good = [{"prompt": c[:-1], "completion": c[-1:]} for c in conversations(6)]
    bad = [
        {"prompt": "text", "completion": [{"role": "assistant", "content": "x"}]},
        {"prompt": [{"role": "user", "content": "q"}], "completion": [{"role": "user", "content": "x"}]},
    ]
    path = write_jsonl(tmp_path / "pc.jsonl", good + bad)
    with pytest.raises(BadRecord, match=r"pc.jsonl:7: prompt and completion must both be strings or both"):
        prepare(chat_cfg(tmp_path / "ds", [path], tokenizers_dir["gen"], fmt="prompt_completion"))
    report = prepare(
        chat_cfg(tmp_path / "ds", [path], tokenizers_dir["gen"], fmt="prompt_completion", on_bad_record="skip")
    )
    assert report.skipped_bad == 2 and report.num_train + report.num_val == 6
    assert any("pc.jsonl:8: the completion has no assistant turn" in note for note in report.bad_examples)


def test_a_template_that_breaks_the_prefix_rule_is_refused_clearly(tmp_path, tokenizers_dir):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in conversations(3)])
    with pytest.raises(
        BadRecord,
        match=r"c.jsonl:1: the chat template has no \{% generation %\} marks and its "
        r"renderings are not prefixes of each other at messages\[2\]",
    ):
        prepare(chat_cfg(tmp_path / "ds", [path], tokenizers_dir["counting"]))


def test_messages_from_a_saved_datasets_dataset(tmp_path, tokenizers_dir):
    """source hf: the same records through ``datasets`` (which fills a missing ``name`` with None)."""
    import datasets

    convs = conversations(8)
    convs[1][0]["name"] = "alice"
    datasets.Dataset.from_list([{"messages": c} for c in convs]).save_to_disk(str(tmp_path / "hf"))
    cfg = PrepareConfig(
        out_dir=str(tmp_path / "ds"),
        source="hf",
        hf=HFSourceConfig(path=str(tmp_path / "hf")),
        val_fraction=0.0,
        template=TemplateConfig(format="messages"),
        tokenizer=TokenizerConfig(kind="pretrained", path=str(tokenizers_dir["gen"])),
        max_seq_len=512,
    )
    report = prepare(cfg)
    assert report.num_train == 8 and report.skipped_bad == 0
    tok = load_tokenizer(tmp_path / "ds" / "tokenizer")
    for row in read_split(tmp_path / "ds" / "train"):
        messages = convs[int(row["sample_id"])]
        assert list(row["loss_mask"]) == expected(tok, messages, generation=True)[1]
    origins = (tmp_path / "ds" / ORIGINS).read_text().splitlines()
    assert json.loads(origins[0])["origin"] == f"hf:{tmp_path / 'hf'}[train] row 1"


def test_chat_needs_a_chat_template(tmp_path, tokenizers_dir):
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in conversations(4)])
    with pytest.raises(ValueError, match="kind 'byte' has none"):
        PrepareConfig(
            out_dir=str(tmp_path / "ds"), source="jsonl", files=[path], template=TemplateConfig(format="messages")
        )
    with pytest.raises(ValueError, match="has no chat template"):
        prepare(chat_cfg(tmp_path / "ds", [path], tokenizers_dir["none"]))
    assert not (tmp_path / "ds").exists()


def test_overlong_conversations_truncate_or_reject(tmp_path, tokenizers_dir):
    convs = conversations(9)
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": c} for c in convs])
    tok = load_tokenizer(tokenizers_dir["gen"])
    lengths = [len(tok.apply_chat_template(c)["input_ids"]) for c in convs]
    cap = sorted(lengths)[4]
    report = prepare(chat_cfg(tmp_path / "t", [path], tokenizers_dir["gen"], max_seq_len=cap, val_fraction=0.0))
    cut = sum(n > cap for n in lengths)
    assert report.truncated + report.rejected_overlong == cut and report.truncated >= 1
    for row in read_split(tmp_path / "t" / "train"):
        assert len(row["tokens"]) <= cap and len(row["loss_mask"]) == len(row["tokens"]) and 1 in row["loss_mask"]
    report = prepare(
        chat_cfg(tmp_path / "r", [path], tokenizers_dir["gen"], max_seq_len=cap, val_fraction=0.0, overlong="reject")
    )
    assert report.rejected_overlong == cut and report.num_train == 9 - cut
    assert any(f"> max_seq_len={cap}" in note for note in report.bad_examples)


def test_a_failing_chat_prepare_leaves_nothing(tmp_path, tokenizers_dir):
    """A bad record after shards were flushed (size_limit 2 KiB): no out_dir, no partial folder."""
    good = [{"messages": c} for c in conversations(60)]
    path = write_jsonl(tmp_path / "c.jsonl", good + ["{not json"])
    with pytest.raises(BadRecord, match=r"c.jsonl:61: invalid JSON"):
        prepare(chat_cfg(tmp_path / "new" / "ds", [path], tokenizers_dir["gen"]))
    assert not (tmp_path / "new").exists()


# -- tokenizer identity ----------------------------------------------------------------------------------
def tiny_llama(folder: Path, tok_dir: Path | None, vocab_size: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    LlamaForCausalLM(config).save_pretrained(str(folder))
    if tok_dir is not None:
        load_tokenizer(tok_dir).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("byte")
    path = write_jsonl(root / "qa.jsonl", [{"prompt": f"{i}+{i}=", "response": str(2 * i)} for i in range(40)])
    prepare(PrepareConfig(out_dir=str(root / "ds"), source="jsonl", files=[path], max_seq_len=16))
    return root / "ds"


def test_prepare_records_the_tokenizer_identity(byte_data):
    from optsel.pipeline.data.tokenizer import file_sha256, vocab_sha256

    report = json.loads((byte_data / "prepare_report.json").read_text())
    ident, tok = report["tokenizer"], load_tokenizer(byte_data / "tokenizer")
    assert ident["kind"] == "byte" and ident["vocab_size"] == len(tok) == 259
    assert (ident["pad_id"], ident["bos_id"], ident["eos_id"]) == (0, 1, 2)
    assert ident["tokenizer_json_sha256"] == file_sha256(byte_data / "tokenizer" / "tokenizer.json")
    assert ident["vocab_sha256"] == vocab_sha256(tok)
    assert report["max_token_id"] == max(max(r["tokens"]) for r in read_split(byte_data / "train"))


def test_identity_check_refuses_mismatches_and_passes_a_match(tmp_path, byte_data, tokenizers_dir):
    from transformers import AutoModelForCausalLM

    from optsel.pipeline.train.model import ModelConfig

    tok = load_tokenizer(byte_data / "tokenizer")
    bpe_model = tiny_llama(tmp_path / "bpe_model", tokenizers_dir["gen"], vocab_size=400)
    cfg = ModelConfig(source="local", path=str(bpe_model))
    model = AutoModelForCausalLM.from_pretrained(bpe_model)
    with pytest.raises(
        ConfigError,
        match=r"model.path.*tokenizer saved with the model .*bpe_model: vocab size 400.*"
        r"not the one the data was prepared with .*tokenizer: vocab size 259",
    ):
        check_identity(byte_data, tok, model, cfg)

    small = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "small", None, vocab_size=200))
    with pytest.raises(ConfigError, match=r"vocabulary of 200, smaller than the data tokenizer's 259"):
        check_identity(byte_data, tok, small, ModelConfig(source="local", path=str(tmp_path / "small")))

    big = AutoModelForCausalLM.from_pretrained(tiny_llama(tmp_path / "big", None, vocab_size=300))
    big.config.eos_token_id = [7, 9]
    with pytest.raises(ConfigError, match=r"eos_token_id \[7, 9\], but the data's tokenizer .* has eos_id 2"):
        check_identity(byte_data, tok, big, None)
    big.config.eos_token_id = [9, 2]
    check_identity(byte_data, tok, big, None)  # padded vocabulary, eos among several: a match

    matching = tiny_llama(tmp_path / "match", byte_data / "tokenizer", vocab_size=259)
    check_identity(
        byte_data, tok, AutoModelForCausalLM.from_pretrained(matching), ModelConfig(source="local", path=str(matching))
    )

    # the data's tokenizer folder swapped after prepare; and a dataset from before identities (a warning)
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(byte_data, copy)
    shutil.rmtree(copy / "tokenizer")
    load_tokenizer(tokenizers_dir["gen"]).save_pretrained(str(copy / "tokenizer"))
    with pytest.raises(
        ConfigError,
        match=r"tokenizer.json \(sha256 [0-9a-f]{64}\) is not the tokenizer the data was "
        r"prepared with",
    ):
        check_identity(copy, load_tokenizer(copy / "tokenizer"), big, None)
    report = json.loads((copy / "prepare_report.json").read_text())
    del report["tokenizer"]["tokenizer_json_sha256"], report["max_token_id"]
    (copy / "prepare_report.json").write_text(json.dumps(report))
    check_identity(copy, load_tokenizer(copy / "tokenizer"), AutoModelForCausalLM.from_pretrained(bpe_model), None)


def test_train_refuses_byte_data_with_a_bpe_model_before_step_1(tmp_path, byte_data, tokenizers_dir):
    """The issue's case, through the CLI: byte-prepared data, a local model saved with its BPE tokenizer."""
    model = tiny_llama(tmp_path / "bpe_model", tokenizers_dir["gen"], vocab_size=400)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.cli",
            "train",
            "configs/demo.yaml",
            f"data.local={byte_data}",
            f"output_dir={tmp_path / 'runs'}",
            "training.progress_bar=false",
            "monitoring.port=0",
            "model.source=local",
            f"model.path={model}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "model.path" in done.stderr and "vocab size 400" in done.stderr and "vocab size 259" in done.stderr
    assert "Traceback" not in done.stderr
    assert not list((tmp_path / "runs").rglob("metrics.jsonl"))  # no step ran


def test_collate_labels_by_the_loss_mask_and_refuses_a_wrong_length():
    row = {
        "tokens": np.array([5, 6, 7, 8, 9]),
        "prompt_len": 1,
        "sample_id": 3,
        "kind_id": 0,
        "loss_mask": np.array([0, 1, 0, 1, 1], dtype=np.uint8),
    }
    batch = collate([row, {**row, "loss_mask": None, "prompt_len": 2}], pad_id=0, max_seq_len=4)
    assert batch["labels"].tolist() == [[-100, 6, -100, 8], [-100, -100, 7, 8]]
    with pytest.raises(ValueError, match=r"sample 3 has a loss_mask of shape \(2,\) for 5 tokens"):
        collate([{**row, "loss_mask": np.array([0, 1])}], pad_id=0)
