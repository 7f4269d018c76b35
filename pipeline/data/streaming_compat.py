"""Import mosaicml-streaming's ``streaming.base`` on machines without a working torchvision.

``import streaming`` runs ``streaming/__init__.py``, which imports ``streaming.vision`` and with it
torchvision. There is no CPU torchvision for torch 2.13 on PyPI, and optsel only uses
``streaming.base`` (MDSWriter, StreamingDataset, StreamingDataLoader, Stream), which needs no
torchvision. So: try the normal import first (GPU images with a matching torchvision take this
path); if it fails on torchvision, register an empty ``streaming`` package object pointing at the
installed package directory, so that ``streaming.base`` imports without running the top-level
``__init__``. Nothing else in optsel imports ``streaming`` directly.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _load_streaming_base() -> types.ModuleType:
    try:
        import streaming  # noqa: PLC0415, F401  (normal path)
    except (ImportError, RuntimeError) as err:
        if "torchvision" not in str(err) and "nms" not in str(err):
            raise
        for name in [m for m in sys.modules if m == "streaming" or m.startswith("streaming.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("streaming")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mosaicml-streaming is not installed (pip install mosaicml-streaming)") from err
        package = types.ModuleType("streaming")
        package.__path__ = list(spec.submodule_search_locations)
        package.__file__ = spec.origin
        package.__package__ = "streaming"
        sys.modules["streaming"] = package
    return importlib.import_module("streaming.base")


_base = _load_streaming_base()
MDSWriter = _base.MDSWriter
StreamingDataset = _base.StreamingDataset
StreamingDataLoader = _base.StreamingDataLoader
Stream = _base.Stream

from streaming.base.util import clean_stale_shared_memory  # noqa: E402

__all__ = ["MDSWriter", "StreamingDataset", "StreamingDataLoader", "Stream", "clean_stale_shared_memory"]
