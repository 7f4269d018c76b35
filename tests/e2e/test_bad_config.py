"""Bad configuration, end to end (rows of the bad-input table in docs/reliability.md): non-finite,
out-of-range and impossible values, an output folder that is a file, max_seq_len beyond the model,
malformed and conflicting configs, strict project JSON, and secrets: masked key names, credentials
in URLs, an unsupported remote scheme named with the URL masked, a config dump with secrets redacted.
Each is an error naming the key (or the masked value), before any work starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from support.common import REPO
from support.common import run_train as _train


# -- 8. values the config must refuse; strict JSON ----------------------------------------------------
@pytest.mark.parametrize(
    "override, key",
    [
        ("optimizer.lr=.inf", "optimizer.lr"),
        ("optimizer.lr=.nan", "optimizer.lr"),
        ("optimizer.lr=inf", "optimizer.lr"),
        ("optimizer.weight_decay=nan", "optimizer.weight_decay"),
        ("optimizer.grad_clip=nan", "optimizer.grad_clip"),
        ("optimizer.min_lr_ratio=-5", "optimizer.min_lr_ratio"),
        ("optimizer.eps=0", "optimizer.eps"),
        ("optimizer.weight_decay=-1", "optimizer.weight_decay"),
        ("engine.collective_timeout_s=.inf", "engine.collective_timeout_s"),
        ("engine.deepspeed_config=/nonexistent/zero3.json", "engine.deepspeed_config"),
    ],
)
def test_config_refuses_non_finite_out_of_range_and_impossible_paths(override, key):
    from optsel.config_loader import ConfigError
    from optsel.pipeline.train.run_config import load_run_config

    with pytest.raises(ConfigError) as err:
        load_run_config(REPO / "configs/demo.yaml", ["engine.name=deepspeed", override])
    assert err.value.path == key, str(err.value)


def test_output_dir_that_is_a_file_is_a_config_error(tmp_path):
    from optsel.config_loader import ConfigError
    from optsel.pipeline.train.run_config import load_run_config

    (tmp_path / "afile").write_text("x")
    for override, key in (
        (f"output_dir={tmp_path / 'afile'}", "output_dir"),
        (f"output_dir={tmp_path / 'afile' / 'below'}", "output_dir"),
    ):
        with pytest.raises(ConfigError, match=r"is a file") as err:
            load_run_config(REPO / "configs/demo.yaml", [override])
        assert err.value.path == key
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "demo").write_text("x")
    with pytest.raises(ConfigError) as err:
        load_run_config(REPO / "configs/demo.yaml", [f"output_dir={tmp_path / 'out'}", "run_name=demo"])
    assert err.value.path == "run_name"
    done = _train([f"output_dir={tmp_path / 'afile'}", "engine.name=fsdp2"], timeout=120)
    assert done.returncode == 2 and "config key 'output_dir'" in done.stderr, done.stderr[-2000:]


def test_max_seq_len_beyond_the_model_is_a_config_error(data_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "optsel.launch.train",
            "configs/demo.yaml",
            f"data.local={data_dir}",
            f"output_dir={tmp_path}",
            "engine.name=fsdp2",
            "data.max_seq_len=4096",
            "monitoring.port=0",
            "training.progress_bar=false",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "data.max_seq_len" in done.stderr and "max_position_embeddings=64" in done.stderr


def test_malformed_and_conflicting_configs_are_named(tmp_path):
    from optsel.config_loader import ConfigError, load_yaml
    from optsel.pipeline.train.run_config import load_run_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  num_steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(bad)
    with pytest.raises(ConfigError, match=r"selection.budget.*pool_size"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.budget=65"])
    config = load_run_config(REPO / "configs/demo.yaml", ["selection.pool_size=63", "selection.budget=8"])
    with pytest.raises(ConfigError, match=r"'selection.pool_size': must be divisible by the world size 2"):
        config.validate_for_world(2)
    with pytest.raises(ConfigError, match=r"selection.options.ftw.exchange.*'sketches' needs gram='sketch'"):
        load_run_config(REPO / "configs/demo.yaml", ["selection.options.ftw.exchange=sketches"])


def test_project_json_is_strict():
    from optsel.pipeline.files import jsonio

    text = jsonio.dumps({"loss": float("nan"), "x": [float("inf"), -float("inf"), 1.5], "n": np.float32("nan")})
    assert json.loads(text, parse_constant=lambda t: pytest.fail(f"bare {t}")) == {
        "loss": None,
        "x": [None, None, 1.5],
        "n": None,
    }


# -- 10. secrets -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    [
        "secret_key",
        "private_key",
        "authorization",
        "passphrase",
        "pwd",
        "password",
        "aws_secret_access_key",
        "api_key",
        "hf_token",
    ],
)
def test_secret_key_names_are_masked(key):
    from optsel.config_loader import redact

    assert redact({"engine": {"extra": {key: "s3cr3t"}}}) == {"engine": {"extra": {key: "***"}}}


@pytest.mark.parametrize(
    "url, secret",
    [
        ("s3://AKIA:pass/with/slashes@bucket/ds", "pass/with/slashes"),
        ("https://host/ds?X-Amz-Signature=abcdef0123&X-Amz-Credential=AKIA%2F2026", "abcdef0123"),
        ("https://acct.blob.core.windows.net/c/ds?sv=2024&sig=Zm9vYmFy%3D", "Zm9vYmFy"),
        ("gs://svc:a/b+c==@bucket/ds", "a/b+c=="),
    ],
)
def test_url_credentials_are_masked(url, secret):
    from optsel.config_loader import redact

    masked = redact({"data": {"remote": url}})["data"]["remote"]
    assert secret not in masked and "***" in masked


def test_unsupported_remote_scheme_is_refused_with_the_url_masked(tmp_path):
    from optsel.config_loader import ConfigError
    from optsel.pipeline.train.run_config import load_run_config

    with pytest.raises(ConfigError) as err:
        load_run_config(REPO / "configs/demo.yaml", ["data.remote=ftp://admin:hunter2/x@host/ds"])
    assert err.value.path == "data.remote" and "unsupported URL scheme 'ftp'" in str(err.value)
    assert "hunter2" not in str(err.value) and "ftp://***@host/ds" in str(err.value)
    done = _train(["data.remote=https://u:topsecret@host/ds?sig=abc123", "engine.name=fsdp2"], timeout=120)
    assert done.returncode == 2 and "data.remote" in done.stderr
    assert "topsecret" not in done.stderr and "abc123" not in done.stderr


def test_config_dump_redacts_secrets(tmp_path):
    import yaml

    from optsel.config_loader import dump_yaml
    from optsel.pipeline.train.run_config import load_run_config

    config = load_run_config(
        REPO / "configs/demo.yaml",
        ["data.remote=s3://AKIAEXAMPLE:hunter2@bucket/ds", "engine.extra.wandb_api_key=abc123"],
    )
    dump_yaml(config, tmp_path / "config.yaml")
    text = (tmp_path / "config.yaml").read_text()
    assert "hunter2" not in text and "AKIAEXAMPLE" not in text and "abc123" not in text
    dumped = yaml.safe_load(text)
    assert dumped["data"]["remote"] == "s3://***@bucket/ds" and dumped["engine"]["extra"]["wandb_api_key"] == "***"
    assert dumped["selection"]["budget"] == config.selection.budget  # nothing else changed
