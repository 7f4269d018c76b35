"""Loading checkpoint files without running code from them.

``torch.load(weights_only=True)`` and a ``find_class`` allowlist for plain pickles (DCP's ``.metadata``)
refuse any global outside a fixed list; the refusal is a :class:`UnsafeCheckpointError` that names the
file and every refused global. The allowlists hold only what optsel's engines actually store:

- DeepSpeed's ``*_optim_states.pt``: ``ZeroStageEnum`` and ``LossScaler`` (two plain classes of DeepSpeed);
- DCP's ``.metadata``: the dataclasses of ``torch.distributed.checkpoint.metadata``, ``_StorageInfo``,
  ``torch.Size``, torch dtypes and layouts, ``pathlib`` paths;
- DCP byte items (non-tensor state such as optimizer ``param_groups``): torch's weights-only defaults.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any, BinaryIO, cast

import torch
import torch.distributed.checkpoint.filesystem as fs
import torch.distributed.checkpoint.metadata as md
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import StorageMeta


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or was made by another config or world size.

    Declared here, below ``optsel.pipeline.checkpoint.manager`` (which raises it the most and imports it from
    here), so that the two modules do not import each other."""


class CheckpointKeyError(CheckpointError):
    """The checkpoint key does not fit the checkpoint: a signed one without a key, or an unsigned one
    with a key. ``resume=auto`` does not fall back to an older checkpoint on it."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects outside the allowlist (loading them could run code)."""


def deepspeed_safe_globals() -> list[Any]:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs
    from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: PLC0415 - optional dependency: imported when the deepspeed engine runs

    return [ZeroStageEnum, LossScaler]


def _refused(source: str | Path | BinaryIO, allowed: list[Any]) -> list[str]:
    names = {
        f"{getattr(a, '__module__', '')}.{getattr(a, '__qualname__', getattr(a, '__name__', ''))}" for a in allowed
    }
    try:
        if hasattr(source, "seek"):
            source.seek(0)
        found = torch.serialization.get_unsafe_globals_in_checkpoint(source)
    except Exception:  # noqa: BLE001 - not a torch zip file: the caller's message says so
        return []
    return sorted(set(found) - names)


def torch_load(
    source: str | Path | BinaryIO, *, what: str, allowed: list[Any] | None = None, map_location: Any = "cpu"
) -> Any:
    """``torch.load(source, weights_only=True)`` with ``allowed`` added to the safe globals; a refused
    global is an UnsafeCheckpointError naming ``what`` and every refused global."""
    allowed = list(allowed or [])
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = _refused(source, allowed)
        raise UnsafeCheckpointError(
            f"checkpoint.resume: {what} holds pickled objects that weights-only loading refuses"
            + (f": {', '.join(refused)}" if refused else f" ({str(err).splitlines()[0][:200]})")
            + "; optsel does not load them (they could run code). Restore the checkpoint from a trusted copy"
        ) from err


# -- plain pickles (DCP .metadata) -------------------------------------------------------------------
def _dcp_allowed() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {}
    for name in (
        "ChunkStorageMetadata",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "StorageMeta",
        "Metadata",
        "MetadataIndex",
        "_MEM_FORMAT_ENCODING",
    ):
        if hasattr(md, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(md, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = fs._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"):
        allowed[("pathlib", name)] = getattr(pathlib, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allowlisted globals and records the refused ones."""

    def __init__(self, file: BinaryIO, allowed: dict[tuple[str, str], Any]):
        super().__init__(file)
        self.allowed = allowed
        self.refused: list[str] = []

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        self.refused.append(f"{module}.{name}")
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def pickle_load(file: BinaryIO, *, what: str, allowed: dict[tuple[str, str], Any]) -> Any:
    unpickler = RestrictedUnpickler(file, allowed)
    try:
        return unpickler.load()
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(
            f"checkpoint.resume: {what} holds pickled objects outside the allowlist: "
            f"{', '.join(unpickler.refused) or str(err)}; optsel does not load them (they could run code)"
        ) from err
    except (EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint.resume: {what} cannot be read ({type(err).__name__}: {err})") from err


def dcp_reader_and_planner(path: str | Path):
    """A FileSystemReader whose ``.metadata`` goes through :class:`RestrictedUnpickler` and a load
    planner whose byte items load weights-only (torch's own use plain ``pickle.load`` /
    ``torch.load(weights_only=False)``)."""

    allowed = _dcp_allowed()

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            rank = kwargs.get("rank")
            meta_path = self._get_metadata_path(rank)
            with self.fs.create_stream(meta_path, "rb") as fh:
                metadata = pickle_load(cast(BinaryIO, fh), what=str(meta_path), allowed=allowed)  # opened "rb"
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch_load(value, what=f"{path} item {read_item.dest_index.fqn}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeFileSystemReader(str(path)), SafeLoadPlanner()
