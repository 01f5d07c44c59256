"""faultline: model weights larger than memory, usable as if they were in memory.

    import faultline
    b = faultline.open("model.apbundle", budget="2G", policy="plan")
    sd = b.state_dict()          # torch tensors over paged memory: no copy, nothing read yet
    arrays = b.numpy()           # the same as NumPy arrays

Tensors come from the bundle on first touch (a whole frame per fault:
read, checked, decompressed) and leave under the budget. They are
read-only views: copy one (``t.clone()``) to change it. Errors are
``OSError`` subclasses carrying the library's message and errno
(``FileNotFoundError`` for a missing model or tensor, ...), or
``ValueError`` for a bad argument (a budget that is not a size, ...).

``faultline.torch`` has the PyTorch helpers: ``assign`` (paged tensors
into a module's parameters without copying), ``PlanHooks`` (prefetch from
the module's own forward order), ``offload`` (a live model under a memory
budget) and ``save`` (a bundle from torch tensors).
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from . import _native

__all__ = ["open", "Bundle", "has_cuda", "parse_size", "__version__"]
__version__: str = _native.version()

# faultline dtype name -> (NumPy dtype name, torch dtype attribute). NumPy
# has no bfloat16 or float8: those come to NumPy as raw unsigned integers.
_DTYPES: Dict[str, Tuple[str, str]] = {
    "f64": ("float64", "float64"),
    "f32": ("float32", "float32"),
    "f16": ("float16", "float16"),
    "bf16": ("uint16", "bfloat16"),
    "f8_e4m3": ("uint8", "float8_e4m3fn"),
    "f8_e5m2": ("uint8", "float8_e5m2"),
    "i64": ("int64", "int64"),
    "i32": ("int32", "int32"),
    "i16": ("int16", "int16"),
    "i8": ("int8", "int8"),
    "u64": ("uint64", "uint64"),
    "u32": ("uint32", "uint32"),
    "u16": ("uint16", "uint16"),
    "u8": ("uint8", "uint8"),
    "bool": ("bool", "bool"),
}

Size = Union[int, str]


def has_cuda() -> bool:
    """True when the GPU tier is built in and a CUDA device is usable."""
    return bool(_native.has_cuda())


def parse_size(size: Size) -> int:
    """Bytes from an int or a string such as '512M' or '2G' (ValueError otherwise)."""
    return int(_native.parse_size(size))


class Bundle:
    """An open bundle, its tensors mapped for demand paging (see ``open``)."""

    def __init__(self, path: str, budget: Optional[Size] = None, policy: Optional[str] = None,
                 mode: Optional[str] = None, prefetch: Optional[int] = None, workers: Optional[int] = None,
                 huge_pages: Optional[bool] = None):
        self.path = str(path)
        self._b = _native.Bundle(self.path, budget, policy or "", mode or "",
                                 -1 if prefetch is None else int(prefetch), -1 if workers is None else int(workers),
                                 -1 if huge_pages is None else int(bool(huge_pages)))
        self._manifest = json.loads(self._b.manifest())
        self._models = {m["name"]: m for m in self._manifest["models"]}

    # ---- what is in it ----
    @property
    def models(self) -> List[str]:
        """Model names, in bundle order."""
        return [m["name"] for m in self._manifest["models"]]

    @property
    def mode(self) -> str:
        """The paging mode in use ('uffd', 'guard' or 'mmap')."""
        return self._b.mode()

    @property
    def huge_units(self) -> bool:
        """Whether sequentially read tensors are installed in whole huge pages."""
        return self._b.huge_units()

    def _model(self, model: Optional[str]) -> Dict[str, Any]:
        if model is None:
            if not self._manifest["models"]:
                raise FileNotFoundError(2, f"{self.path} has no models")
            return self._manifest["models"][0]
        if model not in self._models:
            raise FileNotFoundError(2, f"no model '{model}' in {self.path} (it has: {', '.join(self.models)})")
        return self._models[model]

    def tensors(self, model: Optional[str] = None) -> List[str]:
        """Tensor names of a model (default: the first), in bundle order."""
        return [t["name"] for t in self._model(model)["tensors"]]

    def tensor_info(self, name: str, model: Optional[str] = None) -> Dict[str, Any]:
        """dtype, shape and size of one tensor."""
        for t in self._model(model)["tensors"]:
            if t["name"] == name:
                return {"name": name, "dtype": t["dtype"], "shape": list(t["shape"]), "size": t["size"]}
        raise FileNotFoundError(2, f"no tensor '{name}' in model '{self._model(model)['name']}'")

    def metadata(self, model: Optional[str] = None) -> Dict[str, Any]:
        """The model's metadata (author, license, description, metrics, extra)."""
        return dict(self._model(model).get("metadata", {}))

    def signature(self, model: Optional[str] = None) -> Dict[str, Any]:
        """The model's inference signature: {'inputs': [...], 'outputs': [...]}."""
        return dict(self._model(model).get("signature", {}))

    def version(self, model: Optional[str] = None) -> str:
        return self._model(model).get("version", "")

    def blobs(self, model: Optional[str] = None) -> List[str]:
        return [b["name"] for b in self._model(model).get("blobs", [])]

    def blob(self, name: str, model: Optional[str] = None) -> bytes:
        """A blob's bytes (architecture/config, pre/post-processing config, ...)."""
        return self._b.blob(self._model(model)["name"], name)

    def config(self, model: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The model's JSON config blob ('config'), parsed, or None."""
        m = self._model(model)
        for b in m.get("blobs", []):
            if b["name"] == "config":
                return json.loads(self.blob("config", m["name"]))
        return None

    # ---- tensors ----
    def buffer(self, name: str, model: Optional[str] = None) -> memoryview:
        """A read-only memoryview of the tensor's paged bytes (no copy)."""
        return memoryview(self._b.buffer(self._model(model)["name"], name))

    def array(self, name: str, model: Optional[str] = None):
        """One tensor as a read-only NumPy array over the paged memory."""
        import numpy as np

        info = self.tensor_info(name, model)
        dt = np.dtype(_DTYPES[info["dtype"]][0])
        buf = self.buffer(name, model)
        return np.frombuffer(buf, dtype=dt).reshape(info["shape"])

    def numpy(self, model: Optional[str] = None) -> Dict[str, Any]:
        """Every tensor of a model as NumPy arrays over the paged memory (bf16 and
        float8 as raw unsigned integers: NumPy has no such types)."""
        return {n: self.array(n, model) for n in self.tensors(model)}

    def tensor(self, name: str, model: Optional[str] = None, device: Optional[str] = None):
        """One tensor as a torch.Tensor over the paged memory (no copy).

        With device='cuda' the tensor is copied to the GPU (the device needs
        faultline's GPU tier for streaming larger-than-GPU models; see the README).
        """
        import torch

        info = self.tensor_info(name, model)
        tdt = getattr(torch, _DTYPES[info["dtype"]][1])
        buf = self.buffer(name, model)
        with warnings.catch_warnings():
            # torch warns that the buffer is not writable: it is not, by design.
            warnings.simplefilter("ignore", UserWarning)
            if info["size"] == 0:
                t = torch.empty(info["shape"], dtype=tdt)
            else:
                t = torch.frombuffer(buf, dtype=tdt).reshape(info["shape"])
        if device is not None and str(device) != "cpu":
            t = t.to(device)
        return t

    def state_dict(self, model: Optional[str] = None, device: Optional[str] = None) -> Dict[str, Any]:
        """Every tensor of a model as torch tensors sharing the paged memory:
        no copy, nothing read until touched. ``module.load_state_dict(sd)``
        copies them into a module; ``faultline.torch.assign`` does not."""
        return {n: self.tensor(n, model, device) for n in self.tensors(model)}

    # ---- hints and plans ----
    def prefetch(self, name: str, model: Optional[str] = None) -> None:
        self._b.prefetch(self._model(model)["name"], name)

    will_need = prefetch

    def dont_need(self, name: str, model: Optional[str] = None) -> None:
        self._b.dont_need(self._model(model)["name"], name)

    def pin(self, name: str, model: Optional[str] = None) -> None:
        """Loads the tensor and keeps it resident (counted in the budget) until unpin."""
        self._b.pin(self._model(model)["name"], name)

    def unpin(self, name: str, model: Optional[str] = None) -> None:
        self._b.unpin(self._model(model)["name"], name)

    def set_plan(self, order: Sequence[Union[str, Tuple[str, str]]], model: Optional[str] = None) -> None:
        """The execution plan: tensor names (or (model, name) pairs) in the order
        one pass uses them. Drives plan-aware eviction and prefetch."""
        default = self._model(model)["name"]
        pairs = [(o if isinstance(o, tuple) else (default, o)) for o in order]
        self._b.set_plan(pairs)

    def start_recording(self) -> None:
        """Records the plan from the order of first touches until stop_recording."""
        self._b.start_recording()

    def stop_recording(self) -> None:
        self._b.stop_recording()

    def advance(self, name: str, model: Optional[str] = None) -> None:
        """Tells the pager the pass has reached this tensor (prefetches what follows)."""
        self._b.advance(self._model(model)["name"], name)

    def stats(self) -> Dict[str, Any]:
        """Paging statistics: faults, loads, prefetched, evictions, bytes read,
        resident and peak resident bytes, latency percentiles, per tensor."""
        return self._b.stats()

    def close(self) -> None:
        """Unmaps the tensors once no tensor or array refers to them any more."""
        self._b.close()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<faultline.Bundle {self.path!r} models={self.models} mode={self.mode}>"


def open(path: str, budget: Optional[Size] = None, policy: Optional[str] = None, mode: Optional[str] = None,
         prefetch: Optional[int] = None, workers: Optional[int] = None,
         huge_pages: Optional[bool] = None) -> Bundle:
    """Opens a bundle for demand paging.

    budget: resident bytes (int or '512M', '2G'; default FAULTLINE_BUDGET or 100 MB);
    policy: 'lru', 'lfu' or 'plan'; mode: 'auto', 'uffd', 'guard' or 'mmap';
    prefetch: frames of readahead; workers: fault-service threads;
    huge_pages: load sequentially read tensors in whole huge pages (default on).
    The FAULTLINE_* environment fills in what is not given.
    """
    return Bundle(path, budget, policy, mode, prefetch, workers, huge_pages)
