"""Configs and secrets (the security issue "Untrusted data, shared caches and secrets", part B; rows of
the bad-input table in docs/reliability.md): secrets kept out of config.yaml, log lines, error
messages and metric labels by one rule (config_loader.is_secret_name, mask_secrets), without masking
any real config key; a YAML alias bomb refused at once; run_name kept to one folder below output_dir;
a null output_dir (YAML ``~``) explained; values that used to pass the load and fail later (an
unwritable output_dir, engine.extra under fsdp2, negative counts, seeds out of torch's range) refused
at load, naming the key.

Real code paths only: the real loader on the bundled configs, the real YAML parser, the real
``optsel.launch.train`` entry point (in-process, stopped at the config), a real prometheus registry.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
import typing
from pathlib import Path

import pytest
import yaml

from optsel import config_loader as loader
from optsel.config_loader import ConfigError, dump_yaml, redact, to_plain

from support.common import REPO

DEMO = REPO / "configs" / "demo.yaml"
SECRET = "S3cr3tV4lue"

#: every name the issue lists, in the spellings users write (kebab, snake, camel, upper case)
SECRET_NAMES = [
    "password",
    "passwd",
    "passphrase",
    "pwd",
    "secret",
    "client_secret",
    "clientSecret",
    "api_key",
    "api-key",
    "API_KEY",
    "apiKey",
    "x-api-key",
    "wandb_api_key",
    "access_key",
    "aws_secret_access_key",
    "access_token",
    "access-token",
    "accessToken",
    "token",
    "hf_token",
    "HF_TOKEN",
    "private_key",
    "private-key",
    "bearer",
    "auth",
    "basic_auth",
    "authorization",
    "Authorization",
    "passcode",
    "credential",
    "credentials",
    "sig",
    "signature",
    "X-Amz-Signature",
    "X-Amz-Credential",
    "X-Amz-Security-Token",
    "session_token",
    "cookie",
    "refresh_token",
    "code",
    "key",
    "pass",
    "auth_header",
    "secretkey",
    "privatekey",
    "apikey",
    "accesskey",
    "x-goog-signature",
]
#: names that look a little like secrets and are not (token counts, the tokenizer, words that contain one)
HARMLESS_NAMES = [
    "max_tokens",
    "tokenizer",
    "tokens",
    "num_target_tokens",
    "capture_chunk_tokens",
    "author",
    "authors",
    "authority",
    "single_pass",
    "target_pass",
    "passes",
    "keys",
    "sort_key",
    "monkey",
    "pad_token",
    "eos_token",
    "exit_code",
    "codec",
    "signed",
    "secretary",
    "token_count",
    "region",
    "state",
    "sv",
    "max_new_tokens",
    "use_auth_token_file",
]


def _load(tmp_path: Path, *overrides: str):
    from optsel.pipeline.train.run_config import load_run_config

    return load_run_config(DEMO, [f"output_dir={tmp_path / 'runs'}", *overrides])


def _config_error(tmp_path: Path, *overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, *overrides)
    return err.value


# -- 3. secrets: one rule for keys, URL parameters, log lines and labels ---------------------------------
@pytest.mark.parametrize("name", SECRET_NAMES)
def test_secret_key_names_are_masked(name):
    assert redact({"engine": {"extra": {name: SECRET}}}) == {"engine": {"extra": {name: "***"}}}
    assert redact({"engine": {"extra": {name: 12345}}}) == {"engine": {"extra": {name: "***"}}}  # not only strings
    assert loader.is_secret_name(name)


@pytest.mark.parametrize("name", SECRET_NAMES)
@pytest.mark.parametrize("form", ["query", "second-query", "fragment", "free-text"])
def test_secret_url_parameters_are_masked(name, form):
    text = {
        "query": f"s3://bucket/ds?{name}={SECRET}&region=eu",
        "second-query": f"https://host/ds?region=eu&{name}={SECRET}#top",
        "fragment": f"https://host/callback#{name}={SECRET}&region=eu",
        "free-text": f"override engine.extra.{name}={SECRET} region=eu",
    }[form]
    for masked in (loader.mask_url(text), redact({"data": {"remote": text}})["data"]["remote"]):
        assert SECRET not in masked and f"{name}=***" in masked and "region=eu" in masked, masked


@pytest.mark.parametrize(
    "url",
    [
        "s3://AKIA:pass/with/slashes@bucket/ds",
        "sftp://user:hunter2@host/ds",
        f"gs://svc:{SECRET}@bucket/ds?generation=1",
    ],
)
def test_url_userinfo_is_masked(url):
    masked = loader.mask_url(url)
    assert "://***@" in masked and ":" not in masked.split("://", 1)[1].split("@")[0]
    assert not any(part in masked for part in ("pass/with", "hunter2", SECRET))


@pytest.mark.parametrize("name", HARMLESS_NAMES)
def test_harmless_names_are_not_masked(name):
    assert redact({"a": {name: "value-1"}}) == {"a": {name: "value-1"}}
    url = f"https://host/ds?{name}=value-1#{name}=value-2"
    assert loader.mask_url(url) == url and loader.mask_url(f"set {name}=value-1") == f"set {name}=value-1"
    assert not loader.is_secret_name(name)


def _config_dataclasses() -> set[type]:
    from optsel.pipeline.data.prepare import PrepareConfig
    from optsel.pipeline.train.run_config import RunConfig
    from optsel.selection.base import get_selector_factory, selector_names

    found: set[type] = set()

    def walk(cls: type) -> None:
        if cls in found:
            return
        found.add(cls)
        for tp in typing.get_type_hints(cls).values():
            stack = [tp]
            while stack:
                t = stack.pop()
                if dataclasses.is_dataclass(t):
                    walk(t)
                stack.extend(typing.get_args(t))

    for cls in (
        RunConfig,
        PrepareConfig,
        *(getattr(get_selector_factory(m), "config_class", None) for m in selector_names()),
    ):
        if cls is not None:
            walk(cls)
    return found


def test_no_real_config_key_is_a_secret():
    classes = _config_dataclasses()
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}
    assert {
        "max_new_tokens",
        "num_target_samples",
        "capture_chunk_tokens",
        "tokenizer",
        "single_pass",
        "target_pass",
    } <= names and len(classes) >= 20  # the walk found the selectors' blocks too
    assert {n: v for n, v in redact({n: "value" for n in names}).items() if v != "value"} == {}


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_default_resolved_configs_are_dumped_unmasked(config, tmp_path):
    """Every bundled config, resolved with all its defaults (and every selector's default options
    block), comes out of redact unchanged: no real key or value is masked."""
    from optsel.config_loader import from_mapping
    from optsel.pipeline.train.run_config import load_prepare_config, load_run_config
    from optsel.selection.base import get_selector_factory, selector_names

    path = REPO / "configs" / config
    if "training" in yaml.safe_load(path.read_text()):
        resolved = load_run_config(path, [f"output_dir={tmp_path}"])
        plain = to_plain(resolved)
        for method in selector_names():
            cls = getattr(get_selector_factory(method), "config_class", None)
            if cls is not None:
                plain["selection"]["options"][method] = to_plain(from_mapping(cls, {"budget": 1}))
    else:
        plain = to_plain(load_prepare_config(path, [f"out_dir={tmp_path / 'out'}"]))
    assert "***" not in yaml.safe_dump(plain)
    assert redact(plain) == plain


def test_dump_yaml_holds_no_secret(tmp_path):
    config = _load(
        tmp_path,
        f"engine.extra.api-key={SECRET}",
        "data.remote=s3://b/ds?client_secret=x",
        f"engine.extra.auth.bearer={SECRET}b",
    )
    dump_yaml(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert SECRET not in text and "client_secret=x" not in text, text
    dumped = yaml.safe_load(text)
    assert dumped["engine"]["extra"] == {"api-key": "***", "auth": {"bearer": "***"}}
    assert dumped["data"]["remote"] == "s3://b/ds?client_secret=***"
    assert dumped["training"] == to_plain(config.training)  # nothing else changed


def test_error_messages_and_log_lines_are_masked(tmp_path, capsys, caplog):
    """The entry point prints the config error masked and makes every log handler mask what it writes."""
    from optsel.launch.train import main

    with caplog.at_level(logging.INFO):
        code = main([str(DEMO), f"output_dir={tmp_path}", f"data.remote=ftp://admin:{SECRET}@host/ds?auth=zz9"])
        logging.getLogger("optsel.test").warning("streaming from %s", f"s3://b/ds?X-Amz-Signature={SECRET}&sv=1")
    err = capsys.readouterr().err
    assert code == 2 and "data.remote" in err and SECRET not in err and "zz9" not in err, err
    assert "streaming from s3://b/ds?X-Amz-Signature=***&sv=1" in caplog.text and SECRET not in caplog.text


def test_masking_formatter_keeps_the_format():
    stream = io.StringIO()
    logger = logging.getLogger("optsel.test.formatter")
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        loader.mask_log_handlers(logger)
        loader.mask_log_handlers(logger)  # idempotent
        logger.warning("remote %s", f"https://u:{SECRET}@h/ds#token={SECRET}")
        try:
            raise ValueError(f"cannot read https://h/ds?sig={SECRET}")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    out = stream.getvalue()
    assert out.startswith("WARNING optsel.test.formatter: remote https://***@h/ds#token=***\n")
    assert SECRET not in out and "Traceback" in out and "sig=***" in out


def test_metric_label_values_are_masked():
    from prometheus_client import CollectorRegistry, generate_latest

    from optsel.monitoring.metrics import OptselMetrics

    registry = CollectorRegistry()
    metrics = OptselMetrics(
        registry, rank=0, job_level=True, labels={"engine": "deepspeed", "method": f"ftw?token={SECRET}"}
    )
    metrics.set_info({"version": "1", "remote": f"s3://u:{SECRET}@b/ds?sig={SECRET}"})
    metrics.update({f"select/fallback/https://h/x?api_key={SECRET}": 1.0, "train/loss": 1.0}, step=1)
    text = generate_latest(registry).decode()
    assert SECRET not in text, text
    assert 'method="ftw?token=***"' in text and 'remote="s3://***@b/ds?sig=***"' in text


# -- 8. a YAML alias bomb ----------------------------------------------------------------------------
def _bomb(path: Path, levels: int = 5, width: int = 10) -> Path:
    lines = ["engine:", "  extra:", "    l0: &l0 [" + ", ".join(['"lol"'] * width) + "]"]
    for level in range(1, levels + 1):
        lines.append(f"    l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    text = DEMO.read_text().replace("engine:\n", "\n".join(lines) + "\n", 1)
    path.write_text(text)
    return path


def test_yaml_alias_bomb_is_refused_at_once(tmp_path):
    from optsel.pipeline.train.run_config import load_run_config

    bomb = _bomb(tmp_path / "bomb.yaml")
    assert bomb.stat().st_size < 4096
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        load_run_config(
            bomb, [f"output_dir={tmp_path}", f"engine.deepspeed_config={DEMO.parent / 'deepspeed' / 'zero3.json'}"]
        )
    assert time.perf_counter() - start < 1.0
    line = next(i for i, text in enumerate(bomb.read_text().splitlines(), 1) if "&l0" in text)
    assert str(bomb) in str(err.value) and f"line {line}" in str(err.value) and "anchor" in str(err.value)
    assert not list(tmp_path.rglob("config.yaml"))


@pytest.mark.parametrize("text", ["base: &b {x: 1}\nother: *b\n", "a: &x 1\n", "a: {<<: *x}\n"])
def test_yaml_anchors_and_aliases_are_named_errors(tmp_path, text):
    from optsel.config_loader import load_yaml

    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"{path}, line 1.*(anchor|alias)"):
        load_yaml(path)


@pytest.mark.parametrize(
    "override, key",
    [
        ("engine.extra.x=*a", "engine.extra.x"),
        ("engine.extra.x=&a [1]", "engine.extra.x"),
        ("training.num_steps=[1,", "training.num_steps"),
    ],
)
def test_bad_yaml_in_an_override_names_the_key(tmp_path, override, key):
    assert _config_error(tmp_path, override).path == key


# -- 12. run_name is one folder below output_dir -----------------------------------------------------
@pytest.mark.parametrize("run_name", ["../../x", "..", ".", "a/b", "/abs/x", "a\\b", "''", "' '"])
def test_run_name_must_be_one_plain_folder_name(tmp_path, run_name):
    err = _config_error(tmp_path, f"run_name={run_name}")
    assert err.path == "run_name" and "single plain folder name" in str(err)
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("run_name", ["a\0b", "a\nb", "/etc"])
def test_run_name_is_checked_on_the_dataclass_too(run_name):
    from optsel.config_loader import from_mapping
    from optsel.pipeline.train.run_config import RunConfig

    with pytest.raises(ConfigError) as err:
        from_mapping(RunConfig, {"run_name": run_name, "data": {"local": "d"}, "training": {"num_steps": 1}})
    assert err.value.path == "run_name"


def test_ordinary_run_names_still_load(tmp_path):
    for name in ("demo", "run-1.b", "ftw_seed3", "été"):
        assert _load(tmp_path, f"run_name={name}").run_dir == tmp_path / "runs" / name


# -- 14. output_dir=~ (YAML null) ----------------------------------------------------------------------
def test_null_output_dir_says_yaml_tilde_is_null(tmp_path):
    for err in (_config_error(tmp_path, "output_dir=~"), _config_error(tmp_path, "output_dir=")):
        assert err.path == "output_dir" and "null" in str(err) and "~" in str(err) and "quote" in str(err)
    config = tmp_path / "c.yaml"
    config.write_text(DEMO.read_text().replace("output_dir: ${PWD}/runs", "output_dir: ~"))
    from optsel.pipeline.train.run_config import load_run_config

    with pytest.raises(ConfigError, match=r"got null.*~, null and an empty value mean null") as err:
        load_run_config(config)
    assert err.value.path == "output_dir"


def test_output_dir_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _load(tmp_path, "output_dir=~/runs").output_dir == str(tmp_path / "runs")
    config = tmp_path / "c.yaml"
    config.write_text(DEMO.read_text().replace("output_dir: ${PWD}/runs", "output_dir: ~/from-file"))
    from optsel.pipeline.train.run_config import load_run_config

    assert load_run_config(config, ["engine.name=fsdp2"]).output_dir == str(tmp_path / "from-file")


# -- 11. values that passed the load and failed later --------------------------------------------------
@pytest.mark.parametrize(
    "overrides, key",
    [
        (["output_dir=/proc/optsel-runs"], "output_dir"),
        (["output_dir=/proc"], "output_dir"),
        (["checkpoint.dir=/proc/optsel-checkpoints"], "checkpoint.dir"),
        (["engine.name=fsdp2", "engine.extra.zero_optimization={stage: 3}"], "engine.extra"),
        (["training.max_new_tokens=-1"], "training.max_new_tokens"),
        (["training.max_skipped_steps=-1"], "training.max_skipped_steps"),
        ([f"training.seed={2**64}"], "training.seed"),
        ([f"selection.seed={2**64}"], "selection.seed"),
    ],
)
def test_values_that_would_fail_later_are_refused_at_load(tmp_path, overrides, key):
    err = _config_error(tmp_path, *overrides)
    assert err.path == key, str(err)
    if key in ("output_dir", "checkpoint.dir"):
        assert "not writable" in str(err) and "/proc" in str(err)
    if key == "engine.extra":
        assert "DeepSpeed-only" in str(err) and "fsdp2" in str(err)


def test_unwritable_output_dir_is_a_named_error_from_the_entry_point(tmp_path, capsys):
    from optsel.launch.train import main

    assert main([str(DEMO), "output_dir=/proc/optsel-runs"]) == 2
    err = capsys.readouterr().err
    assert "config key 'output_dir'" in err and "not writable" in err and "Traceback" not in err


def test_the_write_check_leaves_nothing_behind(tmp_path):
    _load(tmp_path)  # output_dir does not exist yet: tried in tmp_path
    assert os.listdir(tmp_path) == []
    config = _load(tmp_path, "engine.name=deepspeed", "engine.extra.wall_clock_breakdown=true")
    assert config.engine.extra == {"wall_clock_breakdown": True}  # still fine for DeepSpeed


def test_shard_errors_mask_the_remote_url():
    from optsel.pipeline.data.shards import ShardError

    err = ShardError("streaming stopped early on s3://bucket/ds?client_secret=hunter2&x=1: timeout")
    assert "hunter2" not in str(err) and "s3://bucket/ds" in str(err)
