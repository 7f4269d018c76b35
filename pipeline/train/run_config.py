"""The run config: one typed tree that ``optsel train CONFIG`` resolves from YAML + overrides.

Each block's dataclass is declared next to the component it configures; this module only composes
them and checks the cross-block rules (e.g. the pool divides evenly over ranks). It lives in pipeline/
because the trainer consumes it; launch/ loads it (``load_run_config``) and never the reverse.
"""

from __future__ import annotations

import errno
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from optsel.config_loader import ConfigError, from_mapping, load_config_data
from optsel.monitoring.sinks import MonitoringConfig
from optsel.pipeline.checkpoint.manager import CheckpointConfig
from optsel.pipeline.data.config import DataConfig
from optsel.pipeline.data.prepare import PrepareConfig
from optsel.pipeline.engines.muon import MUON_REFUSAL
from optsel.pipeline.engines.shared import ENGINES, EngineConfig, OptimizerConfig
from optsel.pipeline.train.callbacks.base import CallbacksConfig
from optsel.pipeline.train.model import ModelConfig
from optsel.selection.base import get_selector_factory, selector_names


@dataclass(kw_only=True)
class TrainingConfig:
    """The loop. Steps are optimizer steps; each consumes ``selection.pool_size`` stream samples."""

    num_steps: int  #: optimizer steps to run; each consumes selection.pool_size stream samples
    eval_every: int = 0  #: evaluate on the held-out target every this many steps (0: only at the end)
    num_eval_samples: int = 64  #: held-out target prompts for loss and exact match
    max_new_tokens: int = 8  #: greedy decoding length for exact match
    seed: int = 0  #: torch's global seed for the run (dropout, ...; the data order has data.shuffle_seed)
    nan_policy: Literal["skip", "raise"] = "skip"  #: a NaN/Inf loss or gradient: skip the optimizer step, or raise
    max_skipped_steps: int = 20  #: abort the run after this many NaN/Inf steps
    progress_bar: bool = True  #: rank 0 shows a tqdm progress bar
    stop_at_step: int = 0  #: save a checkpoint and end the run after this step (0: run to num_steps)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)  #: what the run writes besides metrics

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps: must be >= 1, got {self.num_steps}")
        if self.stop_at_step < 0:
            raise ValueError(f"stop_at_step: must be >= 0 (0: run to num_steps), got {self.stop_at_step}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every: must be >= 0, got {self.eval_every}")
        if self.num_eval_samples < 0:
            raise ValueError(f"num_eval_samples: must be >= 0, got {self.num_eval_samples}")
        if self.max_new_tokens < 0:
            raise ValueError(
                f"max_new_tokens: must be >= 0 (0: exact match is scored on no token), got {self.max_new_tokens}"
            )
        if self.max_skipped_steps < 0:
            raise ValueError(f"max_skipped_steps: must be >= 0, got {self.max_skipped_steps}")
        _check_seed(self.seed)


@dataclass(kw_only=True)
class SelectionConfig:
    """Which selector, the global pool size N and the global data budget k per step.

    ``num_target_samples`` target (validation) samples feed target-aware selectors; they are taken
    from the front of the val split and never used for evaluation. ``options`` maps a method name to
    that method's own config block (e.g. ``{ftw: {gram: exact}}``, FTWConfig's fields); every block is
    validated against its method's dataclass, and the block of ``method`` is used, so switching
    ``selection.method`` by override keeps one config file valid for every method.
    """

    method: str = "random"  #: the selector (a registered name; its options in selection.options.<method>)
    pool_size: int = 32  #: N: global candidates drawn from the stream per step (divisible by the world size)
    budget: int = 8  #: k: samples trained on per step (the same for every method)
    seed: int = 0  #: seed of the selector's own random generator
    num_target_samples: int = 16  #: target samples taken from the front of the val split for target-aware selectors
    #: method name → that selector's options (the keys below); only the block of method is used
    options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.pool_size < 1:
            raise ValueError(f"pool_size: must be >= 1, got {self.pool_size}")
        if not 1 <= self.budget <= self.pool_size:
            raise ValueError(f"budget: must be in [1, pool_size={self.pool_size}], got {self.budget}")
        if self.num_target_samples < 1:
            raise ValueError(f"num_target_samples: must be >= 1, got {self.num_target_samples}")
        _check_seed(self.seed)


def _check_seed(seed: int) -> None:
    """torch's generators take a seed in [-2**63, 2**64); a larger one fails only when the run starts."""
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed: must be in [-2**63, 2**64) (torch's seed range), got {seed}")


def check_run_name(run_name: str) -> None:
    """``run_name`` is one folder below ``output_dir``: a single plain path component."""
    problem = None
    if not run_name or not run_name.strip():
        problem = "is empty"
    elif run_name in (".", ".."):
        problem = "names output_dir itself" if run_name == "." else "names the folder above output_dir"
    elif run_name.startswith(("/", "\\")):
        problem = "is an absolute path"
    elif any(c in run_name for c in "/\\"):
        problem = "contains a path separator (/ or \\)"
    elif any(ord(c) < 32 or ord(c) == 127 for c in run_name):
        problem = "contains a control character (NUL, newline, ...)"
    if problem:
        raise ConfigError(
            "run_name",
            f"{run_name!r} {problem}; it names the run's folder below output_dir and must "
            f"be a single plain folder name (no /, \\, '..', '.', control characters); "
            f"put the parent folders in output_dir instead",
        )


@dataclass(kw_only=True)
class RunConfig:
    run_name: str = "run"  #: the run's folder below output_dir, and the run label of its metrics
    output_dir: str = "runs"  #: folder that holds the run folders
    model: ModelConfig = field(default_factory=ModelConfig)  #: which model to train
    data: DataConfig  #: where the prepared shards are and how they are streamed
    training: TrainingConfig  #: the training loop
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)  #: AdamW (or Muon + AdamW) and its schedule
    engine: EngineConfig = field(default_factory=EngineConfig)  #: the distributed backend
    selection: SelectionConfig = field(default_factory=SelectionConfig)  #: which samples each step trains on
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)  #: where metrics go
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  #: checkpoints and resuming

    def __post_init__(self) -> None:
        check_run_name(self.run_name)
        self._check_muon()
        if self.engine.extra and self.engine.name != "deepspeed":
            raise ConfigError(
                "engine.extra",
                f"is DeepSpeed-only (top-level keys merged into the DeepSpeed JSON) and "
                f"engine.name is {self.engine.name!r}; remove engine.extra "
                f"(got keys {sorted(self.engine.extra)}) or use engine.name=deepspeed",
            )

    def _check_muon(self) -> None:
        """optimizer.name muon against the engine and FTW's geometry (docs/design.md#muon-geometry)."""
        geometry = (self.selection.options.get("ftw") or {}).get("geometry", "adam")
        if self.optimizer.name == "muon" and self.engine.name == "deepspeed":
            raise ConfigError("optimizer.name", MUON_REFUSAL.split(": ", 1)[1])
        if self.selection.method == "ftw" and self.optimizer.name == "muon" and geometry == "adam":
            raise ConfigError(
                "selection.options.ftw.geometry",
                "'adam' reads Adam moments, which Muon's layers do "
                "not have (optimizer.name is 'muon'); use 'auto' "
                "(Muon layers Muon, AdamW layers Adam) or 'muon'",
            )
        if geometry == "muon" and self.optimizer.name != "muon":
            raise ConfigError(
                "selection.options.ftw.geometry",
                f"'muon' needs optimizer.name=muon (got {self.optimizer.name!r}); use 'adam' or 'auto'",
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.run_name

    def validate_for_world(self, world_size: int) -> None:
        """Rules that depend on the launch: the pool and the target split evenly over ranks."""
        if self.selection.pool_size % world_size:
            raise ConfigError(
                "selection.pool_size",
                f"must be divisible by the world size {world_size}, got {self.selection.pool_size}",
            )
        if self.selection.num_target_samples < world_size:
            raise ConfigError("selection.num_target_samples", f"must be >= the world size {world_size}")

    def check_paths(self) -> None:
        """Paths that cannot work, checked on the resolved values: the DeepSpeed JSON must exist (for
        the deepspeed engine); output_dir, the run folder and checkpoint.dir must not be files, and
        must be creatable (their first existing folder writable: tried, not guessed from the mode
        bits, which root ignores and /proc or a read-only mount do not honour)."""
        if self.engine.name == "deepspeed":
            ds = Path(self.engine.deepspeed_config)
            if not ds.is_file():
                raise ConfigError(
                    "engine.deepspeed_config", f"{ds} {'is not a file' if ds.exists() else 'does not exist'}"
                )
        for key, path in (
            ("output_dir", Path(self.output_dir)),
            ("run_name", self.run_dir),
            ("checkpoint.dir", Path(self.checkpoint.dir) if self.checkpoint.dir else None),
        ):
            if path is None:
                continue
            for at in (path, *path.parents):  # the first existing component must be a folder
                if at.exists() or at.is_symlink():
                    if not at.is_dir():
                        raise ConfigError(key, f"{path} cannot be a folder: {at} is a file")
                    break
        for key, path in (
            ("run_name" if self.run_dir.exists() else "output_dir", self.run_dir),
            ("checkpoint.dir", Path(self.checkpoint.dir) if self.checkpoint.dir else None),
        ):
            if path is not None:
                _check_writable(key, path)


def _check_writable(key: str, path: Path) -> None:
    """``path`` can be created or written into. A folder still to be made is tried (a new folder in its
    first existing ancestor, removed at once: root ignores the mode bits, and /proc or a read-only
    mount refuse what os.access allows); an existing one is only asked (nothing is made inside a run's
    folder, which other ranks may be reading)."""

    at = next((p for p in (path, *path.parents) if p.exists()), None)
    if at is None or not at.is_dir():
        return  # a file in the way is reported by check_paths
    try:
        if not os.access(at, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        if at != path:
            os.rmdir(tempfile.mkdtemp(prefix=".optsel-write-check-", dir=at))
    except OSError as err:
        where = "" if at == path else f" ({at}, its first existing folder, takes no new folder)"
        raise ConfigError(
            key, f"{path} is not writable{where}: {err.strerror or err}; choose a folder this user can write to"
        ) from None


# The path keys of a run config and of a prepare config (see config_loader.resolve_paths): relative
# paths written in a config file resolve against that file's folder, relative paths given as
# overrides against the current directory; $VAR/${VAR} expand ($PWD: the current directory).
RUN_PATH_KEYS = {
    "output_dir": "path",
    "model.path": "path",
    "data.local": "path",
    "data.remote": "path",
    "data.cache_dir": "path",
    "engine.deepspeed_config": "path",
    "monitoring.textfile": "path",
    "checkpoint.dir": "path",
    "checkpoint.resume": "path",
}
RUN_PATH_KEEP = {"checkpoint.resume": ("auto",)}
PREPARE_PATH_KEYS = {
    "out_dir": "path",
    "files[]": "path",
    "val_files[]": "path",
    "pysource.roots[]": "path",
    "hf.path": "located",
    "tokenizer.path": "located",
}


def load_run_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """YAML file (or built-in config name, e.g. ``demo``) + ``key.sub=value`` overrides → validated
    RunConfig (errors name the key); paths resolved as described at RUN_PATH_KEYS."""
    data = load_config_data(path, list(overrides or []), RUN_PATH_KEYS, RUN_PATH_KEEP)
    config = from_mapping(RunConfig, data)

    if config.selection.method not in selector_names():
        raise ConfigError(
            "selection.method", f"unknown selector {config.selection.method!r}; known: {', '.join(selector_names())}"
        )
    if config.engine.name not in ENGINES:
        raise ConfigError("engine.name", f"unknown engine {config.engine.name!r}; known: {', '.join(ENGINES.names())}")
    for method in config.selection.options:
        method_config(config.selection, method)  # validate every block, not only the one in use
    config.check_paths()
    return config


def load_prepare_config(path: str | Path, overrides: list[str] | None = None) -> Any:
    """A prepare config file (or built-in name, e.g. ``prepare_synthetic``) + overrides → PrepareConfig."""

    return from_mapping(PrepareConfig, load_config_data(path, list(overrides or []), PREPARE_PATH_KEYS))


def method_config(selection: SelectionConfig, method: str) -> Any:
    """The typed config of ``method`` from ``selection.options[method]`` (None if it takes none)."""

    path = f"selection.options.{method}"
    if method not in selector_names():
        raise ConfigError(path, f"unknown selector {method!r}; known: {', '.join(selector_names())}")
    config_class = getattr(get_selector_factory(method), "config_class", None)
    options = dict(selection.options.get(method) or {})
    if config_class is None:
        if options:
            raise ConfigError(path, f"selector {method!r} takes no options, got {sorted(options)}")
        return None
    if "budget" in options:
        raise ConfigError(f"{path}.budget", "set the budget once, as selection.budget")
    return from_mapping(config_class, {"budget": selection.budget, **options}, path)
