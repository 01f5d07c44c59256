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

import collections.abc
import errno
import json
import os
import warnings
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from . import _native

__all__ = ["open", "open_gpu", "Bundle", "GpuBundle", "StreamedStateDict", "has_cuda", "cuda_describe",
           "parse_size", "__version__"]
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


def cuda_describe() -> str:
    """One line on the GPU tier's build and device, or why it is unusable."""
    return str(_native.cuda_describe())


def parse_size(size: Size) -> int:
    """Bytes from an int or a string such as '512M' or '2G' (ValueError otherwise)."""
    return int(_native.parse_size(size))


class _Manifest:
    """What is in a bundle, from its manifest (shared by Bundle and GpuBundle)."""

    path: str
    _manifest: Dict[str, Any]
    _models: Dict[str, Dict[str, Any]]

    def _load_manifest(self, text: str) -> None:
        self._manifest = json.loads(text)
        self._models = {m["name"]: m for m in self._manifest["models"]}

    @property
    def models(self) -> List[str]:
        """Model names, in bundle order."""
        return [m["name"] for m in self._manifest["models"]]

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

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Bundle(_Manifest):
    """An open bundle, its tensors mapped for demand paging (see ``open``)."""

    def __init__(self, path: str, budget: Optional[Size] = None, policy: Optional[str] = None,
                 mode: Optional[str] = None, prefetch: Optional[int] = None, workers: Optional[int] = None,
                 huge_pages: Optional[bool] = None):
        self.path = str(path)
        self._b = _native.Bundle(self.path, budget, policy or "", mode or "",
                                 -1 if prefetch is None else int(prefetch), -1 if workers is None else int(workers),
                                 -1 if huge_pages is None else int(bool(huge_pages)))
        self._load_manifest(self._b.manifest())
        self._gpu: Optional["GpuBundle"] = None
        self._gpu_key: Any = None

    @property
    def mode(self) -> str:
        """The paging mode in use ('uffd', 'guard' or 'mmap')."""
        return self._b.mode()

    @property
    def huge_units(self) -> bool:
        """Whether sequentially read tensors are installed in whole huge pages."""
        return self._b.huge_units()

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

        With a device other than 'cpu' the tensor is copied there
        (``Tensor.to``); ``state_dict(device='cuda')`` streams through the
        GPU tier instead.
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

    def state_dict(self, model: Optional[str] = None, device: Optional[str] = None,
                   **gpu_options: Any) -> Mapping[str, Any]:
        """Every tensor of a model as torch tensors sharing the paged memory:
        no copy, nothing read until touched. ``module.load_state_dict(sd)``
        copies them into a module; ``faultline.torch.assign`` does not.

        With ``device='cuda'`` (or 'cuda:N') and the GPU tier available
        (``has_cuda()``), the tensors live in the GPU tier instead, streamed
        through a GPU budget (``gpu_options`` go to ``open_gpu``:
        gpu_budget, host_budget, lookahead, eviction, memory, ...).
        That gives a ``StreamedStateDict``: put it into a module with
        ``faultline.torch.assign(module, sd)``, which streams each module's
        tensors to the GPU for its forward pass. Without the GPU tier the
        tensors are copied to the device (``Tensor.to``)."""
        if device is not None and str(device).startswith("cuda") and has_cuda():
            dev = str(device).partition(":")[2]
            key = (int(dev) if dev else None, sorted(gpu_options.items()))
            if self._gpu is None:
                self._gpu = GpuBundle(self.path, device=key[0], **gpu_options)
                self._gpu_key = key
            elif key != self._gpu_key:
                raise ValueError(f"the GPU tier is already open for {self.path} with device {self._gpu_key[0]} and "
                                 f"options {dict(self._gpu_key[1])}; use faultline.open_gpu for a second one")
            return self._gpu.state_dict(model)
        if gpu_options:
            raise ValueError(f"GPU options {sorted(gpu_options)} need device='cuda' and the GPU tier")
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

    def set_plan(self, order: Sequence[Union[str, Tuple[str, str], Sequence[Union[str, Tuple[str, str]]]]],
                 model: Optional[str] = None) -> None:
        """The execution plan, in the order one pass uses it: tensor names (or
        (model, name) pairs), or steps, each a list of the tensors one
        operation uses together (a Linear's weight and bias). Drives
        plan-aware eviction and prefetch. As separate entries, touching the
        bias makes the weight look finished, and it is evicted first while
        the operation still reads it."""
        default = self._model(model)["name"]

        def pair(o: Union[str, Tuple[str, str]]) -> Tuple[str, str]:
            return o if isinstance(o, tuple) else (default, o)

        self._b.set_plan([[pair(o)] if isinstance(o, (str, tuple)) else [pair(x) for x in o] for o in order])

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
        if self._gpu is not None:
            self._gpu.close()
        self._b.close()

    def __repr__(self) -> str:
        return f"<faultline.Bundle {self.path!r} models={self.models} mode={self.mode}>"


# faultline dtype -> the __cuda_array_interface__ typestr of a type of the
# same size that every torch takes (bf16, float8 and unsigned types go as
# signed integers and are viewed as their dtype).
_TYPESTR: Dict[str, str] = {
    "f64": "<f8", "f32": "<f4", "f16": "<f2", "bf16": "<i2", "f8_e4m3": "|i1", "f8_e5m2": "|i1",
    "i64": "<i8", "i32": "<i4", "i16": "<i2", "i8": "|i1", "u64": "<i8", "u32": "<i4", "u16": "<i2",
    "u8": "|u1", "bool": "|b1",
}


class _CudaArray:
    """One GPU-tier tensor as a ``__cuda_array_interface__`` (version 3).
    torch keeps this object, and through it the tier's memory, alive for as
    long as a tensor made from it exists."""

    def __init__(self, buf: Any, shape: Sequence[int], typestr: str):
        self._buf = buf
        self.__cuda_array_interface__ = {"shape": tuple(shape), "typestr": typestr,
                                         "data": (buf.address, False), "version": 3, "strides": None}


def _stream_handle(stream: Any, device: int) -> int:
    """A cudaStream_t as an int: torch's current stream on `device` for None,
    a torch.cuda.Stream's handle, or an int as given."""
    if stream is None:
        import torch

        return int(torch.cuda.current_stream(device).cuda_stream)
    if isinstance(stream, int):
        return stream
    return int(stream.cuda_stream)


class StreamedStateDict(collections.abc.Mapping):
    """The tensors of one model in the GPU tier, by name.

    Their device memory holds the weights only while a plan step that
    contains them is between ``begin`` and ``end``, so reading one outright
    (``sd[name]``, ``load_state_dict(sd)``, ``dict(sd)``) raises instead of
    handing out memory that may not hold the weights yet. Put them into a
    module with ``faultline.torch.assign(module, sd)``, which streams each
    module's tensors to the GPU for its forward pass; or take them with
    ``sd.tensor(name)`` and use them inside ``sd.gpu.step(k)`` of a plan you
    set (``sd.gpu.set_plan``)."""

    def __init__(self, gpu: "GpuBundle", model: Optional[str]):
        self.gpu = gpu
        self.model: str = gpu._model(model)["name"]
        self._names = gpu.tensors(self.model)
        self._tensors: Dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self._names)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __getitem__(self, name: str) -> Any:
        if name not in self._names:
            raise KeyError(name)
        raise RuntimeError(
            f"tensor '{name}' is streamed by the GPU tier and holds its data only inside a plan step: "
            "put the state dict into a module with faultline.torch.assign(module, sd) (it streams each "
            "module's tensors for its forward pass), or take it with sd.tensor(name) and use it between "
            "sd.gpu.begin(step) and sd.gpu.end(step); for plain device copies use Bundle.tensor(name, device=...)")

    def tensor(self, name: str) -> Any:
        """The torch tensor over the tier's memory (no copy; see the class note)."""
        if name not in self._names:
            raise KeyError(name)
        if name not in self._tensors:
            self._tensors[name] = self.gpu.tensor(name, self.model)
        return self._tensors[name]

    def __repr__(self) -> str:
        return f"<faultline.StreamedStateDict model={self.model!r} tensors={len(self)} device=cuda:{self.gpu.device}>"


class GpuBundle(_Manifest):
    """A bundle in the GPU tier (see ``open_gpu``): every tensor in mapped
    memory (2 MiB or more) or CUDA managed memory, decoded from the bundle
    when a plan step first needs it,
    prefetched to the GPU ``lookahead`` steps ahead and evicted under the GPU
    budget in plan order.

    Contract (as in C++): a tensor holds its data for GPU work queued on a
    stream between ``begin(step)`` and ``end(step)`` of a plan step that
    contains it; ``faultline.torch.assign`` / ``stream`` drive that from a
    module's forward hooks."""

    def __init__(self, path: str, device: Optional[int] = None, gpu_budget: Optional[Size] = None,
                 host_budget: Optional[Size] = None, lookahead: Optional[int] = None,
                 eviction: Optional[str] = None, read_mostly: Optional[bool] = None,
                 monitor: Optional[bool] = None, memory: Optional[str] = None):
        self.path = str(path)
        # Mapped memory unless told otherwise: torch only ever uses these
        # tensors on the GPU, and mapped ones stream at the link's rate
        # (managed memory where the device has no virtual memory management).
        auto = memory is None and not os.environ.get("FAULTLINE_GPU_MEMORY")

        def native(kind: str) -> Any:
            return _native.GpuBundle(self.path, -1 if device is None else int(device), gpu_budget, host_budget,
                                     -1 if lookahead is None else int(lookahead), eviction or "",
                                     -1 if read_mostly is None else int(bool(read_mostly)),
                                     -1 if monitor is None else int(bool(monitor)), kind)

        try:
            self._g = native("mapped" if auto else memory or "")
        except OSError as e:
            # Only mapped memory's own refusals ("... which mapped memory
            # needs"), not a missing device, fall back.
            if not (auto and e.errno == errno.ENOTSUP and "mapped memory" in str(e)):
                raise
            self._g = native("managed")
        self._load_manifest(self._g.manifest())
        self.device: int = self._g.device()
        self._plan: List[List[Tuple[str, str]]] = []

    def tensor(self, name: str, model: Optional[str] = None) -> Any:
        """One tensor as a torch tensor on cuda:device over the tier's memory
        (no copy). See the class note for when it holds the weights."""
        import torch

        info = self.tensor_info(name, model)
        tdt = getattr(torch, _DTYPES[info["dtype"]][1])
        dev = torch.device("cuda", self.device)
        if info["size"] == 0:
            return torch.empty(info["shape"], dtype=tdt, device=dev)
        buf = self._g.buffer(self._model(model)["name"], name)
        t = torch.as_tensor(_CudaArray(buf, info["shape"], _TYPESTR[info["dtype"]]), device=dev)
        return t if t.dtype == tdt else t.view(tdt)

    def state_dict(self, model: Optional[str] = None) -> StreamedStateDict:
        """The model's tensors (see ``StreamedStateDict``)."""
        return StreamedStateDict(self, model)

    def set_plan(self, steps: Sequence[Sequence[Union[str, Tuple[str, str]]]], model: Optional[str] = None) -> None:
        """The execution plan: for each step of one pass, the tensors it uses
        (names, or (model, name) pairs). Not while a step is begun (EBUSY)."""
        default = self._model(model)["name"]
        plan = [[o if isinstance(o, tuple) else (default, o) for o in step] for step in steps]
        self._g.set_plan(plan)
        self._plan = plan

    @property
    def plan(self) -> List[List[Tuple[str, str]]]:
        return [list(step) for step in self._plan]

    def begin(self, step: int, stream: Any = None) -> None:
        """Makes step `step`'s tensors usable by work queued on `stream`
        (default: torch's current stream) after this returns, and prefetches
        the next steps. Raises OSError for a bad frame or a step over budget."""
        self._g.begin(int(step), _stream_handle(stream, self.device))

    def end(self, step: int, stream: Any = None) -> None:
        """The work that uses step `step` has been queued on `stream`; its
        tensors may leave the GPU once that work is done."""
        self._g.end(int(step), _stream_handle(stream, self.device))

    @contextmanager
    def step(self, step: int, stream: Any = None) -> Iterator[None]:
        """``with gpu.step(k): ...``: begin and end around a block."""
        self.begin(step, stream)
        try:
            yield
        finally:
            self.end(step, stream)

    def synchronize(self) -> None:
        """Waits until every transfer the tier queued has finished."""
        self._g.synchronize()

    def stats(self) -> Dict[str, Any]:
        """Transfers to and from the GPU, decodes, discards, resident bytes on
        the device and the host, the budget and the memory monitor's readings."""
        return self._g.stats()

    def close(self) -> None:
        """Waits for queued transfers; the managed memory is freed once no
        tensor refers to it any more."""
        self._g.close()

    def __repr__(self) -> str:
        return f"<faultline.GpuBundle {self.path!r} models={self.models} device=cuda:{self.device}>"


def open_gpu(path: str, device: Optional[int] = None, gpu_budget: Optional[Size] = None,
             host_budget: Optional[Size] = None, lookahead: Optional[int] = None, eviction: Optional[str] = None,
             read_mostly: Optional[bool] = None, monitor: Optional[bool] = None,
             memory: Optional[str] = None) -> GpuBundle:
    """Opens a bundle in the GPU tier (needs ``has_cuda()``; OSError with
    ENOTSUP otherwise, saying why).

    device: CUDA device index; gpu_budget: bytes of tensors on the GPU at
    once (default FAULTLINE_GPU_BUDGET or half the free GPU memory);
    host_budget: bytes of decoded host copies; lookahead: plan steps
    prefetched ahead; eviction: 'host' (keep the host copy) or 'discard'
    (decode again later); read_mostly: the read-mostly advisory; monitor:
    watch GPU and host memory pressure; memory: 'mapped' (tensors of 2 MiB or
    more in GPU memory mapped under their addresses while staged, copied
    from pinned host copies at the link's rate; the default, or managed
    memory where the device lacks virtual memory management) or 'managed'
    (CUDA managed memory, advised and prefetched; FAULTLINE_GPU_MEMORY sets
    the default). FAULTLINE_GPU_* fill in the rest."""
    return GpuBundle(path, device, gpu_budget, host_budget, lookahead, eviction, read_mostly, monitor, memory)


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
