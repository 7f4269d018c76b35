"""Checkpoints: where, how often, atomic writes, keep the last N, resume from the newest complete one.

Layout of one checkpoint (``<dir>/step_00000040/``)::
    engine/                 the engine's own format: DeepSpeed ``save_checkpoint`` (tag "engine",
                            ZeRO-3 partitions per rank, client_state) or FSDP2 through
                            ``torch.distributed.checkpoint`` (sharded .distcp files + engine_extra.pt)
    trainer_rank00000.pt    per rank: step counters, torch RNG, StreamingDataLoader state, selector
                            state (RNG, target cache, UDS buffer, counters)
    meta.json               written last: step, world size, the config it was made with, and the
                            manifest (size + SHA-256 of every other file), HMAC-signed when a key is
                            configured (OPTSEL_CHECKPOINT_KEY / OPTSEL_CHECKPOINT_KEY_FILE)

A save is written into ``step_N.partial/`` and renamed to ``step_N/`` by rank 0 only after every rank
has finished and ``meta.json`` is on disk, so a crash mid-save leaves a ``.partial`` folder that is
never picked (and is removed by the next save). The directory must be on a filesystem every rank
sees (the usual shared filesystem of a cluster).

Before any file of a checkpoint is unpickled, :meth:`CheckpointManager.verify` checks every file
against the manifest (and the HMAC when a key is configured); files not in the manifest are refused.
Then everything is read weights-only (see ``optsel.pipeline.checkpoint.safe_load``). ``resume=auto`` falls back
to the newest checkpoint that verifies, saying which one failed and why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optsel import distributed
from optsel.config_loader import redact
from optsel.pipeline.checkpoint.safe_load import CheckpointError, CheckpointKeyError, torch_load
from optsel.pipeline.files import jsonio

log = logging.getLogger("optsel.checkpoint")

STEP_DIR = re.compile(r"^step_(\d{8})$")
_SHA256 = re.compile(r"[0-9a-f]{64}")
#: config keys that may change between a checkpoint and the run that resumes from it
RESUMABLE_CHANGES = (
    "run_name",
    "output_dir",
    "checkpoint.",
    "monitoring.",
    "training.progress_bar",
    "training.callbacks.",
    "training.eval_every",
    "training.stop_at_step",
    "training.num_steps",
    "data.local",
    "data.remote",
    "data.cache_dir",
    "data.num_workers",
    "data.predownload",
    "data.download_timeout",
    "engine.collective_timeout_s",
)


KEY_ENV, KEY_FILE_ENV = "OPTSEL_CHECKPOINT_KEY", "OPTSEL_CHECKPOINT_KEY_FILE"
MANIFEST_CHUNK = 1 << 20


def checkpoint_key() -> bytes | None:
    """The HMAC key for checkpoint manifests: ``$OPTSEL_CHECKPOINT_KEY`` (the key itself) or the
    contents of the file ``$OPTSEL_CHECKPOINT_KEY_FILE``; None when neither is set. Never from the
    run config (it is copied into every run folder). A variable that is set but empty (or blank), a
    key file that cannot be read or holds only white space, or both variables at once are errors: a
    run that meant to sign must never save unsigned. :class:`CheckpointManager` reads it once, when
    the run starts, so a bad key stops the run before step 1."""
    value, file = os.environ.get(KEY_ENV), os.environ.get(KEY_FILE_ENV)
    if value is not None and file is not None:
        raise CheckpointError(f"{KEY_ENV} and {KEY_FILE_ENV} are both set; set one")
    if value is not None:
        if not value.strip():
            raise CheckpointError(
                f"{KEY_ENV} is set but empty; give it the key, or unset it to save unsigned checkpoints"
            )
        return value.encode()
    if file is not None:
        if not file.strip():
            raise CheckpointError(f"{KEY_FILE_ENV} is set but empty; give it the key file's path, or unset it")
        try:
            key = Path(file).read_bytes().strip()
        except OSError as err:
            raise CheckpointError(f"{KEY_FILE_ENV}={file}: cannot read the checkpoint key ({err})") from err
        if not key:
            raise CheckpointError(f"{KEY_FILE_ENV}={file}: the key file is empty or holds only white space")
        return key
    return None


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(MANIFEST_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative path: {"bytes", "sha256"}} of every file under ``folder`` except meta.json."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.relative_to(folder).as_posix() != "meta.json":
            out[path.relative_to(folder).as_posix()] = {"bytes": path.stat().st_size, "sha256": file_digest(path)}
    return out


def _signed_bytes(record: dict[str, Any]) -> bytes:
    body = {k: v for k, v in record.items() if k != "hmac"}
    return jsonio.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()


def sign(record: dict[str, Any], key: bytes) -> str:
    return hmac.new(key, _signed_bytes(record), hashlib.sha256).hexdigest()


@dataclass(kw_only=True)
class CheckpointConfig:
    """dir: checkpoint folder ("" = <run_dir>/checkpoints); every_steps: periodic saves (0: none; a
    run that checkpoints also saves at its end); keep_last: newest complete checkpoints kept;
    save_on_signals: signals (as SLURM preemption sends) that make every rank save at the next step
    boundary and end the run (SIGINT, Ctrl-C, always does); resume: "" (start fresh), "auto" (the
    newest complete checkpoint in ``dir`` that verifies, if there is one) or the path of one checkpoint
    folder; overwrite: a fresh start into a ``dir`` holding checkpoints moves them aside (without it,
    such a start is refused); allow_unsigned: resume an HMAC-signed checkpoint although no key is
    configured (file hashes are still checked; later saves are unsigned) instead of refusing it;
    allow_other_data: resume a checkpoint made from another dataset (its index hashes differ from this
    run's) instead of refusing it."""

    dir: str = ""  #: checkpoint folder ('': <run_dir>/checkpoints)
    every_steps: int = 0  #: save every this many steps (0: none; a run that checkpoints also saves at its end)
    keep_last: int = 2  #: newest complete checkpoints kept
    #: signals that make every rank save at the next step and end the run (SIGINT always does)
    save_on_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    resume: str = ""  #: '': start fresh; auto: the newest complete checkpoint in dir, if any; or a checkpoint folder
    overwrite: bool = False  #: a fresh start into a dir holding checkpoints moves them aside (else it is refused)
    #: resume an HMAC-signed checkpoint without the key (hashes still checked) instead of refusing
    allow_unsigned: bool = False
    allow_other_data: bool = False  #: resume a checkpoint made from another dataset instead of refusing it

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"every_steps: must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"keep_last: must be >= 1, got {self.keep_last}")
        for name in self.save_on_signals:
            if not isinstance(getattr(signal, str(name), None), signal.Signals):
                raise ValueError(f"save_on_signals: {name!r} is not a signal name (e.g. SIGTERM, SIGUSR1)")
            if name in ("SIGKILL", "SIGSTOP"):
                raise ValueError(f"save_on_signals: {name} cannot be caught")


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a.b": leaf} for a nested dict (lists are leaves)."""
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: node}


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys (full paths) whose values differ and that a resume must not change."""
    a, b = flatten(saved), flatten(current)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == allowed or (allowed.endswith(".") and key.startswith(allowed)) for allowed in RESUMABLE_CHANGES):
            continue
        if a.get(key, "<absent>") != b.get(key, "<absent>"):
            diffs.append(f"{key}: checkpoint {a.get(key, '<absent>')!r}, this run {b.get(key, '<absent>')!r}")
    return diffs


def _step_of(path: Path) -> int | None:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return _step_of(path) is not None and (path / "meta.json").is_file()


class CheckpointManager:
    """Saves and finds checkpoints under ``root`` for one run (every rank makes one)."""

    def __init__(self, config: CheckpointConfig, run_dir: Path):
        self.config = config
        self.root = Path(config.dir) if config.dir else Path(run_dir) / "checkpoints"
        self.dist = distributed.info()
        self.key = checkpoint_key()  # decided when the run starts: a bad key is an error before step 1

    # -- finding ---------------------------------------------------------------------------------
    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: _step_of(p) or 0)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def to_resume(self) -> Path | None:
        """The checkpoint that ``config.resume`` names (None: start fresh), verified against its
        manifest. ``auto`` falls back to the newest complete checkpoint that verifies, logging why each
        newer one was skipped; an explicit path that fails verification is an error naming the file."""
        choice = self.config.resume
        if not choice:
            return None
        if choice == "auto":
            candidates = self.complete()
            if not candidates:
                log.info("checkpoint.resume=auto: no complete checkpoint under %s; starting fresh", self.root)
                return None
            problems = []
            for path in reversed(candidates):
                try:
                    self.verify(path)
                except CheckpointKeyError:
                    raise  # a key problem is the run's, not the checkpoint's: no fallback to an older one
                except CheckpointError as err:
                    problems.append(str(err))
                    log.warning("checkpoint.resume=auto: skipping %s: %s", path.name, err)
                    continue
                if problems:
                    log.warning(
                        "checkpoint.resume=auto: falling back to %s, the newest checkpoint that verifies "
                        "(%d newer one(s) failed verification)",
                        path,
                        len(problems),
                    )
                return path
            raise CheckpointError(
                "checkpoint.resume=auto: no checkpoint under "
                + str(self.root)
                + " verifies:\n  "
                + "\n  ".join(problems)
            )
        path = Path(choice)
        if not path.is_dir():
            raise CheckpointError(f"checkpoint.resume: {path} does not exist")
        if not is_complete(path):
            raise CheckpointError(
                f"checkpoint.resume: {path} is not a complete checkpoint (a step_NNNNNNNN "
                f"folder with meta.json; an interrupted save leaves step_N.partial)"
            )
        self.verify(path)
        return path

    def verify(self, path: Path) -> dict[str, Any]:
        """meta.json of ``path`` after checking every file against its manifest (size, SHA-256; no
        file missing, none extra) and, when a key is configured, the manifest's HMAC. Nothing is
        unpickled. Raises CheckpointError naming the first bad file."""
        meta_file = path / "meta.json"
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(
                f"checkpoint.resume: {meta_file} cannot be read ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}; truncated or corrupt)"
            ) from err
        if not isinstance(meta, dict) or not isinstance(meta.get("manifest"), dict):
            raise CheckpointError(
                f"checkpoint.resume: {meta_file} has no file manifest (made by an older optsel, "
                f"or edited); it cannot be verified, so it is not loaded"
            )
        if self.key is not None:
            if "hmac" not in meta:
                raise CheckpointKeyError(
                    f"checkpoint.resume: {meta_file} is not signed, but a checkpoint key is "
                    f"configured ({KEY_ENV} / {KEY_FILE_ENV}); refusing an unsigned checkpoint"
                )
            if not hmac.compare_digest(str(meta["hmac"]), sign(meta, self.key)):
                raise CheckpointError(
                    f"checkpoint.resume: {meta_file}: the manifest's HMAC does not match (the "
                    f"checkpoint was changed after it was saved, or signed with another key)"
                )
        elif "hmac" in meta:
            if not self.config.allow_unsigned:
                raise CheckpointKeyError(
                    f"checkpoint.resume: {meta_file} is HMAC-signed but no key is configured ({KEY_ENV} / "
                    f"{KEY_FILE_ENV}); set the key, or pass --allow-unsigned (checkpoint.allow_unsigned=true) to "
                    f"resume checking file hashes only and save unsigned checkpoints from now on"
                )
            log.warning(
                "%s is HMAC-signed but no key is configured; checkpoint.allow_unsigned: checking file "
                "hashes only, and this run saves unsigned checkpoints",
                meta_file,
            )
        manifest = _manifest_entries(meta["manifest"], meta_file)
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() or p.is_symlink()}
        extra = sorted(present - set(manifest) - {"meta.json"})
        if extra:
            raise CheckpointError(
                f"checkpoint.resume: {path / extra[0]} is not in the checkpoint's manifest "
                f"({len(extra)} unexpected file(s)); refusing to load a folder with added files"
            )
        for rel, (expected_bytes, expected_sha) in sorted(manifest.items()):
            file = path / rel
            if file.is_symlink():
                raise CheckpointError(
                    f"checkpoint.resume: {file} is a symbolic link (to {os.readlink(file)}); a "
                    f"checkpoint holds plain files only, so it is not followed"
                )
            if not file.is_file():
                raise CheckpointError(f"checkpoint.resume: {file} is missing (listed in the manifest)")
            size = file.stat().st_size
            if size != expected_bytes:
                raise CheckpointError(
                    f"checkpoint.resume: {file} has {size} bytes, the manifest says {expected_bytes} "
                    f"(truncated or replaced)"
                )
            if file_digest(file) != expected_sha:
                raise CheckpointError(f"checkpoint.resume: {file} fails its SHA-256 check (corrupt or replaced)")
        return meta

    # -- saving ----------------------------------------------------------------------------------
    def save(
        self, step: int, save_engine: Callable[[Path], None], rank_state: dict[str, Any], meta: dict[str, Any]
    ) -> tuple[Path, float]:
        """Collective: every rank calls it. ``save_engine(dir)`` writes the engine's state into
        ``dir``; ``rank_state`` is this rank's trainer state. Returns (final path, seconds)."""
        start = time.perf_counter()
        final = self.root / f"step_{step:08d}"
        partial = self.root / f"step_{step:08d}.partial"
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir()
        distributed.barrier()
        save_engine(partial / "engine")
        _atomic_torch_save(rank_state, partial / f"trainer_rank{self.dist.rank:05d}.pt")
        distributed.barrier()
        seconds = time.perf_counter() - start
        if self.dist.is_main:
            record = {
                **meta,
                "step": step,
                "world_size": self.dist.world_size,
                "save_seconds": seconds,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            record = json.loads(jsonio.dumps(record, default=str))  # what meta.json will hold (signed as read back)
            record["manifest"] = build_manifest(partial)
            if self.key is not None:
                record["hmac"] = sign(record, self.key)
            _atomic_write_text(partial / "meta.json", jsonio.dumps(record, indent=2, default=str))
            if final.exists():
                shutil.rmtree(final)
            os.replace(partial, final)
            _fsync_dir(self.root)
            self._prune()
        distributed.barrier()
        return final, time.perf_counter() - start

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; remove stale partial saves."""
        for old in self.complete()[: -self.config.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s", old)
        for stale in self.root.glob("step_*.partial"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------------
    def check_compatible(
        self, path: Path, config: dict[str, Any], world_size: int, data: dict[str, str] | None = None
    ) -> dict[str, Any]:
        """meta.json of ``path``, after checking it was made by this config, world size and (when
        ``data``, this run's :func:`dataset_identity`, is given) dataset."""
        meta_file = path / "meta.json"
        meta = json.loads(meta_file.read_text())
        saved_world = meta.get("world_size")
        if isinstance(saved_world, bool) or not isinstance(saved_world, int) or saved_world < 1:
            raise CheckpointError(
                f"checkpoint.resume: {meta_file}: 'world_size' is missing or not a positive "
                f"integer ({saved_world!r}); the checkpoint cannot be matched to this run"
            )
        if saved_world != world_size:
            raise CheckpointError(
                f"checkpoint.resume: {path} was saved by {saved_world} ranks, this run has "
                f"{world_size}; resume with the same number of ranks"
            )
        saved_config = meta.get("config", {})
        if not isinstance(saved_config, dict):
            raise CheckpointError(f"checkpoint.resume: {meta_file}: 'config' is not a mapping")
        diffs = config_differences(redact(saved_config), config)  # older checkpoints kept some secrets unmasked
        if diffs:
            raise CheckpointError(
                f"checkpoint.resume: {path} was made with another config; these keys differ:\n  " + "\n  ".join(diffs)
            )
        if data is not None:
            self._check_same_data(meta_file, meta.get("data"), data)
        return meta

    def _check_same_data(self, meta_file: Path, saved: Any, current: dict[str, str]) -> None:
        if saved is None:
            log.warning(
                "%s records no dataset identity (saved by an older optsel): cannot check that this run "
                "streams the same data",
                meta_file,
            )
            return
        if saved == current:
            return
        splits = sorted(set(saved) | set(current)) if isinstance(saved, dict) else sorted(current)
        lines = [
            f"{split}: checkpoint {_short(saved.get(split) if isinstance(saved, dict) else saved)}, "
            f"this run {_short(current.get(split))}"
            for split in splits
            if not isinstance(saved, dict) or saved.get(split) != current.get(split)
        ]
        if self.config.allow_other_data:
            log.warning(
                "checkpoint.allow_other_data: resuming %s onto other data (index.json differs: %s)",
                meta_file.parent,
                "; ".join(lines),
            )
            return
        raise CheckpointError(
            f"checkpoint.resume: {meta_file.parent} was made from other data (the SHA-256 of the "
            f"splits' index.json differ):\n  "
            + "\n  ".join(lines)
            + "\nresume with the data it was made from, or pass --allow-other-data "
            "(checkpoint.allow_other_data=true) to continue on this data"
        )

    def load_rank_state(self, path: Path) -> dict[str, Any]:
        file = path / f"trainer_rank{self.dist.rank:05d}.pt"
        if not file.is_file():
            raise CheckpointError(
                f"checkpoint.resume: {file} is missing (was the checkpoint saved by this world size?)"
            )
        try:
            return torch_load(file, what=str(file))
        except CheckpointError:
            raise
        except Exception as err:  # truncated / corrupt file
            raise CheckpointError(
                f"checkpoint.resume: {file} cannot be read ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
            ) from err


def _manifest_entries(manifest: dict[str, Any], meta_file: Path) -> dict[str, tuple[int, str]]:
    """{relative path: (bytes, sha256)} of a manifest read from ``meta_file``, each entry checked (a
    mapping with an integer ``bytes`` >= 0 and a 64-hex-digit ``sha256``); CheckpointError otherwise."""
    out: dict[str, tuple[int, str]] = {}
    for rel, info in manifest.items():
        if ".." in Path(rel).parts or Path(rel).is_absolute() or not rel:
            raise CheckpointError(f"checkpoint.resume: {meta_file} lists {rel!r}, outside the checkpoint")
        if not isinstance(info, dict):
            raise CheckpointError(
                f"checkpoint.resume: {meta_file}: manifest entry {rel!r} is a "
                f"{type(info).__name__}, expected a mapping with 'bytes' and 'sha256'"
            )
        size, digest = info.get("bytes"), info.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CheckpointError(
                f"checkpoint.resume: {meta_file}: manifest entry {rel!r} has bytes={size!r}, expected an integer >= 0"
            )
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise CheckpointError(
                f"checkpoint.resume: {meta_file}: manifest entry {rel!r} has no valid 'sha256' (got {digest!r:.80})"
            )
        out[rel] = (size, digest)
    return out


def _short(digest: Any) -> str:
    return f"{digest[:12]}…" if isinstance(digest, str) else "<absent>"


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    _fsync_file(tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    _fsync_file(tmp)
    os.replace(tmp, path)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
