"""``optsel export RUN_DIR --out DIR``: a run's checkpoint back to a Hugging Face ``save_pretrained`` folder.

What is written (``DIR``)::
    config.json, model.safetensors, generation_config.json   the model (fp32 master weights); with LoRA and
                                                              ``lora="merge"`` the adapters merged into it
    adapter_config.json, adapter_model.safetensors           instead, with ``lora="adapter"`` (peft's own
                                                              format); the base beside it in ``base/`` for a
                                                              model built from config, or named (model.path)
    tokenizer.json, tokenizer_config.json, ...               the run's tokenizer (``<data.local>/tokenizer``;
                                                              the byte and BPE kinds are HF fast tokenizers too)
    export.json                                              where it came from: run, checkpoint, step, engine

The checkpoint is untrusted input and goes through the same gate as a resume: every file is checked
against the manifest of ``meta.json`` (and its HMAC when a key is configured, see
:func:`optsel.pipeline.checkpoint.manager.checkpoint_key`) before anything is read, everything is unpickled
weights-only with the engines' allowlists (``optsel.pipeline.checkpoint.safe_load``), and no file outside the
checkpoint folder is read on its word (the tokenizer and a ``local`` base model are read where the run's
config says, ``data.local`` / ``model.path``, as training read them). The weights are consolidated by
the libraries themselves: DeepSpeed's ``get_fp32_state_dict_from_zero_checkpoint`` (our tag folder is
``engine`` and there is no ``latest`` file, so the tag is passed) and ``torch.distributed.checkpoint``
loading without a process group into a model built from the run's config. The architecture comes from
the config in the checkpoint's meta.json (covered by its HMAC when signed), which must agree with the
run folder's ``config.yaml``.

The result is written into a temporary folder beside ``DIR`` and renamed to ``DIR`` at the end, so a
failed export leaves nothing; ``DIR`` must not exist or be empty unless ``overwrite``, which moves
its contents aside to ``DIR.replaced-<time>`` (deleting nothing).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast
from unittest import mock

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from optsel import __version__
from optsel.config_loader import from_mapping
from optsel.pipeline.checkpoint.manager import (
    STEP_DIR,
    CheckpointConfig,
    CheckpointError,
    CheckpointManager,
    flatten,
    is_complete,
)
from optsel.pipeline.checkpoint.safe_load import (
    UnsafeCheckpointError,
    dcp_reader_and_planner,
    deepspeed_safe_globals,
    torch_load,
)
from optsel.pipeline.data.tokenizer import load_tokenizer
from optsel.pipeline.files.folders import new_sibling
from optsel.pipeline.train.model import ModelConfig, build_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("optsel.export")

#: the DeepSpeed tag folder inside a checkpoint (``DeepSpeedEngine.save_checkpoint``: ``step_N/engine``)
DEEPSPEED_TAG = "engine"


@dataclass(kw_only=True)
class ExportOptions:
    """run_dir: the run folder (``<output_dir>/<run_name>``) or one checkpoint folder (``step_NNNNNNNN``);
    out: the folder to write; checkpoint: "latest" (the newest complete checkpoint) or a step number;
    lora: "merge" (a plain model with the adapters merged in) or "adapter" (peft's adapter folder);
    tokenizer: a tokenizer folder to use instead of the run's (``<data.local>/tokenizer``; "" = the run's);
    overwrite: move a non-empty ``out`` aside instead of refusing; allow_unsigned: accept an HMAC-signed
    checkpoint although no key is configured (file hashes are still checked)."""

    run_dir: str
    out: str
    checkpoint: str = "latest"
    lora: Literal["merge", "adapter"] = "merge"
    tokenizer: str = ""
    overwrite: bool = False
    allow_unsigned: bool = False

    def __post_init__(self) -> None:
        if self.lora not in ("merge", "adapter"):
            raise ValueError(f"lora: must be 'merge' or 'adapter', got {self.lora!r}")
        if self.checkpoint != "latest" and not (self.checkpoint.isdigit() and int(self.checkpoint) >= 0):
            raise ValueError(f"checkpoint: must be 'latest' or a step number, got {self.checkpoint!r}")


def _plain(err: BaseException) -> str:
    """A checkpoint error's text without the resume-only ``checkpoint.resume:`` prefix."""
    return str(err).replace("checkpoint.resume: ", "")


# -- which checkpoint -------------------------------------------------------------------------------
def _run_yaml(run_dir: Path) -> dict[str, Any] | None:
    """The run folder's config.yaml as plain data (None when there is none)."""

    file = run_dir / "config.yaml"
    if not file.is_file():
        return None
    try:
        data = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file} is not valid YAML ({err})") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{file} is not a mapping (the resolved run config optsel writes)")
    return data


def find_checkpoint(run_dir: Path, which: str) -> tuple[Path, Path | None]:
    """(checkpoint folder, run folder or None) for ``run_dir`` and ``which`` ("latest" or a step).
    ``run_dir`` may be a run folder (its checkpoints: ``checkpoint.dir`` of its config.yaml, else
    ``<run_dir>/checkpoints``) or a checkpoint folder itself."""
    if not run_dir.is_dir():
        raise FileNotFoundError(
            f"{run_dir} does not exist (expected a run folder <output_dir>/<run_name> or a "
            f"checkpoint folder step_NNNNNNNN)"
        )
    if step_name := STEP_DIR.match(run_dir.name):
        if not is_complete(run_dir):
            raise CheckpointError(f"{run_dir} is not a complete checkpoint (no meta.json; an interrupted save)")
        if which != "latest" and int(which) != int(step_name.group(1)):
            raise CheckpointError(f"--checkpoint {which}: {run_dir} is the checkpoint of another step")
        run = run_dir.parent.parent
        return run_dir, run if (run / "config.yaml").is_file() else None
    config = _run_yaml(run_dir)
    ckpt_dir = str(((config or {}).get("checkpoint") or {}).get("dir") or "")
    root = Path(ckpt_dir) if ckpt_dir else run_dir / "checkpoints"
    manager = CheckpointManager(CheckpointConfig(dir=str(root)), run_dir)
    done = manager.complete()
    if not done:
        partial = sorted(p.name for p in root.glob("step_*.partial")) if root.is_dir() else []
        raise CheckpointError(
            f"no complete checkpoint under {root}"
            + (f" (only interrupted saves: {', '.join(partial)})" if partial else "")
            + "; a run saves checkpoints with checkpoint.every_steps > 0"
        )
    if which == "latest":
        return done[-1], run_dir
    chosen = root / f"step_{int(which):08d}"
    if chosen not in done:
        steps = ", ".join(str(int(m.group(1))) if (m := STEP_DIR.match(p.name)) else p.name for p in done)
        raise CheckpointError(
            f"--checkpoint {which}: no complete checkpoint of step {int(which)} under {root} "
            f"(complete ones: steps {steps})"
        )
    return chosen, run_dir


def verified_meta(path: Path, allow_unsigned: bool) -> dict[str, Any]:
    """meta.json of checkpoint ``path`` after the resume gate (manifest hashes, HMAC when a key is set)."""
    manager = CheckpointManager(CheckpointConfig(dir=str(path.parent), allow_unsigned=allow_unsigned), path.parent)
    try:
        meta = manager.verify(path)
    except CheckpointError as err:
        raise type(err)(_plain(err)) from err
    for key in ("engine", "world_size", "config"):
        if key not in meta:
            raise CheckpointError(f"{path / 'meta.json'}: '{key}' is missing")
    if not isinstance(meta["config"], dict) or not isinstance(meta["config"].get("model"), dict):
        raise CheckpointError(f"{path / 'meta.json'}: 'config' has no 'model' section")
    return meta


def run_model_section(meta: dict[str, Any], run_dir: Path | None) -> dict[str, Any]:
    """The checkpoint's model section, after checking that the run folder's config.yaml agrees with it
    (and on ``data.local``, where the tokenizer is read from)."""
    model = meta["config"]["model"]
    saved = _run_yaml(run_dir) if run_dir is not None else None
    if run_dir is not None and saved is not None and isinstance(saved.get("model"), dict):
        local = {"data.local": (meta["config"].get("data") or {}).get("local")}
        a = {**flatten(model, "model"), **local}
        b = {**flatten(saved["model"], "model"), "data.local": (saved.get("data") or {}).get("local")}
        diffs = [
            f"{k}: checkpoint {a.get(k, '<absent>')!r}, config.yaml {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b))
            if a.get(k, "<absent>") != b.get(k, "<absent>")
        ]
        if diffs:
            raise CheckpointError(
                f"{run_dir / 'config.yaml'} and the checkpoint's meta.json describe different "
                f"models:\n  " + "\n  ".join(diffs)
            )
    return model


# -- the model and its weights ----------------------------------------------------------------------
def build_run_model(model_section: dict[str, Any], tokenizer) -> nn.Module:
    """The run's model (float32, LoRA-wrapped if the run used LoRA), built as the trainer builds it."""

    cfg = from_mapping(ModelConfig, model_section, "model")
    return build_model(
        cfg,
        vocab_size=len(tokenizer),
        pad_id=tokenizer.pad_token_id,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.eos_token_id,
    )


class _WeightsOnlyTorch:
    """``torch`` as DeepSpeed's zero_to_fp32 sees it during an export: its ``torch.load(...,
    weights_only=False)`` becomes optsel's weights-only load with DeepSpeed's two allowlisted classes
    (the rest of ``torch`` is the real module)."""

    def __init__(self) -> None:
        self._allowed = deepspeed_safe_globals()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def load(self, f: Any, map_location: Any = None, **_unsafe: Any) -> Any:  # weights_only/mmap are not honoured

        return torch_load(f, what=str(f), allowed=self._allowed, map_location=map_location or "cpu")


def deepspeed_state_dict(step_dir: Path) -> dict[str, torch.Tensor]:
    """The full fp32 state dict of a ZeRO-3 checkpoint (``step_dir/engine``), consolidated by DeepSpeed's
    ``get_fp32_state_dict_from_zero_checkpoint`` with ``tag="engine"`` (reading only that folder's
    ``*_model_states.pt`` / ``*_optim_states.pt``, weights-only)."""

    from deepspeed.utils import zero_to_fp32  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs

    if not (step_dir / DEEPSPEED_TAG).is_dir():
        raise CheckpointError(f"{step_dir / DEEPSPEED_TAG} is missing (not a deepspeed checkpoint?)")
    printed = io.StringIO()
    try:
        with (
            mock.patch.object(zero_to_fp32, "torch", _WeightsOnlyTorch()),
            mock.patch.object(zero_to_fp32, "tqdm", lambda items, **_: items, create=True),
            contextlib.redirect_stdout(printed),
        ):  # its progress bars and prints: not ours to show
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(step_dir), tag=DEEPSPEED_TAG)
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(_plain(err)) from err
    except (FileNotFoundError, ValueError, KeyError, RuntimeError, TypeError, AttributeError, IndexError) as err:
        raise CheckpointError(
            f"DeepSpeed could not consolidate {step_dir / DEEPSPEED_TAG}: "
            f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
        ) from err
    log.debug("zero_to_fp32: %s", printed.getvalue().strip())
    return state


def load_deepspeed_weights(model: nn.Module, step_dir: Path) -> None:
    state = deepspeed_state_dict(step_dir)
    expected = model.state_dict()
    _check_keys(set(state), set(expected), step_dir / DEEPSPEED_TAG)
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise CheckpointError(
                f"{step_dir / DEEPSPEED_TAG}: {name} has shape {tuple(tensor.shape)}, the run's "
                f"model expects {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)


def _check_keys(found: set[str], expected: set[str], where: Path) -> None:
    missing, extra = sorted(expected - found), sorted(found - expected)
    if missing or extra:
        parts = (
            [f"missing {len(missing)} weight(s) of the run's model (e.g. {', '.join(missing[:3])})"] if missing else []
        ) + (
            [f"{len(extra)} weight(s) the run's model has no place for (e.g. {', '.join(extra[:3])})"] if extra else []
        )
        raise CheckpointError(f"{where} does not fit the model of the run's config: {'; '.join(parts)}")


def load_fsdp2_weights(model: nn.Module, step_dir: Path) -> None:
    """Load the model half of an FSDP2 ``torch.distributed.checkpoint`` (``step_dir/engine``) into the
    full, unsharded ``model`` in one process (no process group): DCP reassembles every tensor from the
    ranks' shards. The ``.metadata`` is read through optsel's restricted unpickler, byte items
    weights-only, and every shard file it names must be a plain file name inside the folder."""

    folder = step_dir / "engine"
    if not (folder / ".metadata").is_file():
        raise CheckpointError(f"{folder / '.metadata'} is missing (not an fsdp2 checkpoint?)")
    reader, planner = dcp_reader_and_planner(folder)
    try:
        metadata = reader.read_metadata()
    except UnsafeCheckpointError as err:
        raise UnsafeCheckpointError(_plain(err)) from err
    except CheckpointError as err:
        raise CheckpointError(_plain(err)) from err
    for info in metadata.storage_data.values():
        rel = str(getattr(info, "relative_path", ""))
        if not rel or Path(rel).name != rel or rel in (".", ".."):
            raise CheckpointError(
                f"{folder / '.metadata'} points at {rel!r}, outside the checkpoint folder; refusing it"
            )
    saved = {k[len("model.") :]: v for k, v in metadata.state_dict_metadata.items() if k.startswith("model.")}
    state = model.state_dict()
    _check_keys(set(saved), set(state), folder)
    for name, tensor in state.items():
        info = saved[name]
        if not isinstance(info, TensorStorageMetadata) or tuple(info.size) != tuple(tensor.shape):
            shape = tuple(info.size) if isinstance(info, TensorStorageMetadata) else type(info).__name__
            raise CheckpointError(f"{folder}: {name} has shape {shape}, the run's model expects {tuple(tensor.shape)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")
        try:
            dcp.load({"model": state}, storage_reader=reader, planner=planner, no_dist=True)
        except UnsafeCheckpointError as err:
            raise UnsafeCheckpointError(_plain(err)) from err
        except Exception as err:  # noqa: BLE001 - DCP wraps reader errors (a short shard file, ...)
            first = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
            raise CheckpointError(
                f"torch.distributed.checkpoint could not load {folder}: {type(err).__name__}: {first}"
            ) from err
    model.load_state_dict(state, strict=True)  # the same tensors: a no-op unless a tied weight was copied


# -- writing ----------------------------------------------------------------------------------------
def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"--out {out} is not empty; choose a new folder, or pass --overwrite to move its "
            f"contents aside to {out.name}.replaced-<time> (nothing is deleted)"
        )


def _move_aside(out: Path) -> Path:
    """Rename ``out`` to a new ``OUT.replaced-<time>[-N]`` beside it (reserved by mkdir, then replaced)."""
    aside = new_sibling(out, f".replaced-{time.strftime('%Y%m%d-%H%M%S')}", f"moving {out} aside")
    os.rename(out, aside)  # a directory may replace an empty one
    return aside


def _write_model(model: nn.Module, work: Path, final: Path, lora: str, model_section: dict[str, Any]) -> dict[str, Any]:
    """save_pretrained ``model`` into ``work``; returns what export.json says about the weights."""
    from peft import PeftModel  # noqa: PLC0415 - optional dependency (LoRA)

    if not isinstance(model, PeftModel):
        if lora == "adapter":
            raise ValueError(
                "lora: 'adapter' asks for peft's adapter folder, but the run trained no LoRA adapters "
                "(model.lora is null in its config); export it without --lora adapter"
            )
        cast("PreTrainedModel", model).save_pretrained(str(work))  # build_run_model's transformers model
        return {"lora": None}
    if lora == "merge":
        model.merge_and_unload().save_pretrained(str(work))
        return {"lora": "merged"}
    if model_section.get("source") == "local":
        base = str(Path(model_section["path"]).resolve())
        note = f"the run's model.path {base} (the frozen base it trained on)"
    else:
        base = str(final.resolve() / "base")
        note = "base/ here: the run's base model (built from its config; frozen during training)"
    model.peft_config["default"].base_model_name_or_path = base
    model.save_pretrained(str(work))
    if model_section.get("source") != "local":
        model.unload().save_pretrained(str(work / "base"))
    return {"lora": "adapter", "base_model": base, "base_note": note}


@contextlib.contextmanager
def _quiet_transformers():
    """No "Writing model shards" progress bar from save_pretrained (restored afterwards)."""
    from transformers.utils import logging as hf_logging  # noqa: PLC0415 - heavy: imported when a model is built or loaded

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


@dataclass(kw_only=True)
class ExportReport:
    out: str
    checkpoint: str
    step: int
    engine: str
    world_size: int
    lora: str | None
    files: list[str]
    replaced: str | None = None
    seconds: float = 0.0


def export(opts: ExportOptions) -> ExportReport:
    """Write ``opts.out`` from the run's checkpoint (see the module docstring). Raises CheckpointError
    (no checkpoint, unknown step, a corrupt, tampered or unsafe one, a model that does not fit),
    FileNotFoundError (no run folder or tokenizer), FileExistsError (``out`` not empty)."""

    start = time.perf_counter()
    out = Path(opts.out)
    _check_out(out, opts.overwrite)
    step_dir, run_dir = find_checkpoint(Path(opts.run_dir), opts.checkpoint)
    try:
        meta = verified_meta(step_dir, opts.allow_unsigned)
    except CheckpointError as err:
        older = sorted(p.name for p in step_dir.parent.glob("step_*") if is_complete(p) and p.name < step_dir.name)
        if opts.checkpoint == "latest" and older:  # never a silent fallback to an older step
            raise type(err)(
                f"{err}\n(the newest checkpoint; older complete ones: {', '.join(older)}: "
                f"export one with --checkpoint STEP)"
            ) from err
        raise
    model_section = run_model_section(meta, run_dir)
    engine = meta["engine"]
    if engine not in ("deepspeed", "fsdp2"):
        raise CheckpointError(
            f"{step_dir / 'meta.json'}: engine {engine!r} is not one optsel exports (deepspeed, fsdp2)"
        )
    data_local = str((meta["config"].get("data") or {}).get("local") or "")
    tok_dir = Path(opts.tokenizer) if opts.tokenizer else Path(data_local) / "tokenizer"
    if not tok_dir.is_dir():
        raise FileNotFoundError(
            f"the run's tokenizer {tok_dir} (data.local of its config + /tokenizer) is not "
            f"there; pass --tokenizer DIR (the folder prepare wrote as <data>/tokenizer)"
        )
    tokenizer = load_tokenizer(tok_dir, key="--tokenizer" if opts.tokenizer else "data.local")
    model = build_run_model(model_section, tokenizer)
    (load_deepspeed_weights if engine == "deepspeed" else load_fsdp2_weights)(model, step_dir)
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with _quiet_transformers():
            about = _write_model(model, work, out, opts.lora, model_section)
        tokenizer.save_pretrained(str(work))
        record = {
            "optsel_version": __version__,
            "run_dir": str(run_dir) if run_dir else None,
            "checkpoint": str(step_dir.resolve()),
            "step": meta.get("step"),
            "engine": engine,
            "world_size": meta["world_size"],
            "signed": "hmac" in meta,
            "tokenizer": str(tok_dir.resolve()),
            **about,
        }
        (work / "export.json").write_text(json.dumps(record, indent=2) + "\n")
        _check_out(out, opts.overwrite)  # again: something may have appeared there meanwhile
        replaced = str(_move_aside(out)) if out.is_dir() and any(out.iterdir()) else None
        if out.is_dir():
            out.rmdir()  # empty: rename cannot replace it portably
        os.rename(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return ExportReport(
        out=str(out),
        checkpoint=str(step_dir),
        step=int(meta.get("step", -1)),
        engine=engine,
        world_size=int(meta["world_size"]),
        lora=about["lora"],
        files=files,
        replaced=replaced,
        seconds=time.perf_counter() - start,
    )
