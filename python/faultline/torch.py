"""PyTorch helpers for faultline.

- ``assign(module, state_dict)``: puts (paged) tensors into a module's
  parameters and buffers without copying them.
- ``PlanHooks(module, bundle)``: forward pre-hooks that record the order in
  which modules run on the first pass and hand it to the pager as the
  execution plan; later passes advance the plan, so they are prefetched and
  evicted by it.
- ``offload(model, budget=...)``: a live model's large parameters moved into
  managed memory with a resident budget and compressed spill, the next
  modules read back ahead by forward pre-hooks (``OffloadManager``:
  ``summary()``, ``prefetch(module)``, ``evict(module)``, ``cleanup()``).
- ``save(model_or_state_dict, path, ...)``: a bundle written from torch tensors.
- ``stream(module, sd)`` (and ``assign`` given a ``StreamedStateDict``): a
  module whose weights live in the GPU tier, each module's tensors streamed
  to the GPU for its forward pass under the GPU budget.
"""
from __future__ import annotations

import inspect
import json
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Type, Union

import torch
from torch import nn

from . import Bundle, GpuBundle, Size, StreamedStateDict, _native, parse_size

__all__ = ["assign", "stream", "GpuStreamHooks", "PlanHooks", "offload", "OffloadManager", "MemoryConfig", "PRESETS", "save"]

_TORCH_TO_FL = {
    torch.float64: "f64", torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16",
    torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
    torch.bool: "bool",
}
for _name, _fl in (("float8_e4m3fn", "f8_e4m3"), ("float8_e5m2", "f8_e5m2"), ("uint16", "u16"),
                   ("uint32", "u32"), ("uint64", "u64")):
    if hasattr(torch, _name):
        _TORCH_TO_FL[getattr(torch, _name)] = _fl


def _split(module: nn.Module, name: str) -> Tuple[nn.Module, str]:
    parts = name.split(".")
    for p in parts[:-1]:
        module = getattr(module, p)
    return module, parts[-1]


def assign(module: nn.Module, state_dict: Union[Dict[str, torch.Tensor], StreamedStateDict],
           strict: bool = True) -> nn.Module:
    """Makes the module's parameters and buffers *be* the given tensors (no copy).

    Parameters become ``requires_grad=False`` (paged tensors are read-only).
    With strict, names missing on either side or shapes that differ raise
    KeyError/ValueError naming them. Given a ``StreamedStateDict`` (from
    ``Bundle.state_dict(device='cuda')``) it also installs ``GpuStreamHooks``,
    kept on the module as ``module.faultline_stream``."""
    if isinstance(state_dict, StreamedStateDict):
        stream(module, state_dict, strict=strict)
        return module
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    if strict:
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        if missing or unexpected:
            raise KeyError(f"state_dict does not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, t in state_dict.items():
        if name not in own:
            continue
        if tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not match the module's {tuple(own[name].shape)}")
        owner, leaf = _split(module, name)
        if leaf in owner._parameters:
            owner._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[leaf] = t
    return module


def _modules_with_tensors(module: nn.Module, names: Iterable[str], prefix: str):
    """(module name, module, its own tensors' bundle names) for every module
    that owns parameters or buffers found among `names`, in registration order."""
    names = set(names)
    for mname, m in module.named_modules():
        own = [n for n, _ in m.named_parameters(recurse=False)] + [n for n, _ in m.named_buffers(recurse=False)]
        tensors = [prefix + (f"{mname}.{n}" if mname else n) for n in own]
        tensors = [t for t in tensors if t in names]
        if tensors:
            yield mname, m, tensors


class _Hooks:
    """Hooks installed on a module, removed together (also on ``with`` exit)."""

    def __init__(self) -> None:
        self._handles: List[Any] = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class PlanHooks(_Hooks):
    """Prefetch from the model itself.

    Forward pre-hooks on every module that owns parameters. Until the first
    pass ends, the plan is the modules' registration order (which is most
    often the order they run in), one step per module (its tensors are used
    together, so none of them looks finished while it runs); the first pass
    records the order in which modules really run, and when it ends (the
    first call of ``finish_recording()``) that order becomes the plan. Each
    hook tells the pager where the pass is (``Bundle.advance``), so the
    tensors that follow are loaded ahead and the ones used furthest in the
    future are evicted first (use ``policy='plan'``).

    ``prefix`` maps module parameter names to bundle tensor names
    (``prefix + name``); ``model`` names the bundle model."""

    def __init__(self, module: nn.Module, bundle: Bundle, model: Optional[str] = None, prefix: str = ""):
        super().__init__()
        self.bundle = bundle
        self.model = model
        self.prefix = prefix
        self._steps: List[List[str]] = []
        self._recording = True
        self.modules_seen: List[str] = []
        initial = []
        for mname, m, tensors in _modules_with_tensors(module, bundle.tensors(model), prefix):
            self._handles.append(m.register_forward_pre_hook(self._hook(mname, tensors)))
            initial.append(tensors)
        if initial:
            bundle.set_plan(initial, model)

    def _hook(self, mname: str, tensors: List[str]):
        def hook(_module, _inputs):
            if self._recording and mname not in self.modules_seen:
                self.modules_seen.append(mname)
                self._steps.append(tensors)
            self.bundle.advance(tensors[0], self.model)
        return hook

    def finish_recording(self) -> List[str]:
        """Ends the recording pass and installs the plan (one step per
        module: its tensors are used together); returns its tensors in order."""
        if self._recording:
            self._recording = False
            if self._steps:
                self.bundle.set_plan(self._steps, self.model)
        return self.plan

    @property
    def plan(self) -> List[str]:
        """The plan's tensors, in order."""
        return [t for step in self._steps for t in step]

    @property
    def steps(self) -> List[List[str]]:
        """The plan's steps: each module's tensors, in the order modules ran."""
        return [list(step) for step in self._steps]


# Whether forward hooks can run when forward raises (torch >= 2.0).
_ALWAYS_CALL = "always_call" in inspect.signature(nn.Module.register_forward_hook).parameters


def _forward_hook(module: nn.Module, hook):
    """A forward hook that also runs when forward raises, where torch can."""
    if _ALWAYS_CALL:
        return module.register_forward_hook(hook, always_call=True)
    return module.register_forward_hook(hook)


class GpuStreamHooks(_Hooks):
    """Streams a module's GPU-tier weights through the GPU budget.

    Every module that owns parameters or buffers found in the bundle is one
    plan step (its own tensors). A forward pre-hook begins the step on
    torch's current stream (the tier makes the stream wait for the
    tensors' transfer and prefetches the next ``lookahead`` steps); a
    forward hook ends it (the tensors may leave the GPU once the queued work
    is done). The plan starts in module registration order; the first
    forward pass records the order in which modules really run, and the
    plan is set to it when that pass ends, so later passes prefetch and
    evict by it. Inference only: no backward through streamed weights.
    A forward that raises ends its steps (torch >= 2.0 runs the hooks; with
    an older torch the steps it left begun are ended when the next pass
    begins, or by ``remove()``)."""

    def __init__(self, module: nn.Module, gpu: GpuBundle, model: Optional[str] = None, prefix: str = ""):
        super().__init__()
        self.gpu = gpu
        self.model = gpu._model(model)["name"]
        self._steps: List[List[str]] = []       # tensors of each module, by module number
        self._step_of: List[int] = []           # module number -> its plan step
        self._recording = True
        self._order: List[int] = []
        self._depth = 0
        self._open: List[int] = []              # plan steps begun and not yet ended
        found = list(_modules_with_tensors(module, gpu.tensors(self.model), prefix))
        if not found:
            raise ValueError(f"no parameter or buffer of the module is a tensor of model '{self.model}'"
                             + (f" (with prefix '{prefix}')" if prefix else ""))
        # Pass boundaries: the root module's own forward, hooked first (its
        # pre-hook runs before the root's step begins) and last (its forward
        # hook runs after the root's step ends).
        self._handles.append(module.register_forward_pre_hook(self._pass_begin))
        for k, (_, m, tensors) in enumerate(found):
            self._steps.append(tensors)
            self._step_of.append(k)
            self._handles.append(m.register_forward_pre_hook(self._pre(k)))
            self._handles.append(_forward_hook(m, self._post(k)))
        self._handles.append(_forward_hook(module, self._pass_end))
        self.gpu.set_plan(self._steps, self.model)

    def _pass_begin(self, _module, _inputs):
        if self._depth > 0 and not _ALWAYS_CALL:
            # The last pass raised before its hooks ran (the root module is
            # not re-entered by its own forward).
            self._end_open()
            self._depth = 0
        self._depth += 1

    def _end_open(self) -> None:
        while self._open:
            self.gpu.end(self._open.pop())

    def _pass_end(self, _module, _inputs, _output):
        self._depth -= 1
        if self._depth == 0 and self._recording:
            self._recording = False
            order = self._order + [k for k in range(len(self._steps)) if k not in self._order]
            if order != list(range(len(self._steps))):
                self.gpu.set_plan([self._steps[k] for k in order], self.model)
                for step, k in enumerate(order):
                    self._step_of[k] = step

    def _pre(self, k: int):
        def hook(_module, _inputs):
            if self._recording and k not in self._order:
                self._order.append(k)
            step = self._step_of[k]
            self.gpu.begin(step)
            self._open.append(step)
        return hook

    def _post(self, k: int):
        def hook(_module, _inputs, _output):
            step = self._step_of[k]
            if step in self._open:
                self._open.remove(step)
                self.gpu.end(step)
        return hook

    def remove(self) -> None:
        self._end_open()
        super().remove()

    @property
    def plan(self) -> List[List[str]]:
        """The tensors of each plan step, in plan order."""
        return [[n for _, n in step] for step in self.gpu.plan]


def stream(module: nn.Module, sd: StreamedStateDict, strict: bool = True, prefix: str = "") -> GpuStreamHooks:
    """Puts a ``StreamedStateDict``'s tensors into the module (no copy, like
    ``assign``) and installs ``GpuStreamHooks``; returns them (also kept as
    ``module.faultline_stream``). ``prefix`` maps module names to bundle
    names (``prefix + name``)."""
    if not isinstance(sd, StreamedStateDict):
        raise TypeError("stream() takes the StreamedStateDict of Bundle.state_dict(device='cuda') "
                        "or GpuBundle.state_dict()")
    own = dict(module.named_parameters())
    own.update(dict(module.named_buffers()))
    wanted = {n: prefix + n for n in own}
    if strict:
        missing = sorted(n for n, b in wanted.items() if b not in sd)
        unexpected = sorted(set(sd) - set(wanted.values()))
        if missing or unexpected:
            raise KeyError(f"state_dict does not match the module: missing {missing[:5]}, unexpected {unexpected[:5]}")
    assign(module, {n: sd.tensor(b) for n, b in wanted.items() if b in sd}, strict=False)
    hooks = GpuStreamHooks(module, sd.gpu, sd.model, prefix)
    module.faultline_stream = hooks
    return hooks


class MemoryConfig:
    """What ``offload`` manages and how (the shape of a memory manager's config).

    budget: resident bytes of managed parameters (int or '2G');
    min_size: parameters smaller than this stay resident (bytes);
    manage_1d: also manage one-dimensional parameters (biases, norm scales);
    layer_types: only parameters of these module types (None = any);
    max_spill: refuse to offload when the worst-case spill (managed - budget)
      would exceed this many bytes (None = no cap);
    codec: 'zstd' or 'raw' for spilled chunks; spill_dir: where the spill file goes;
    prefetch: read the parameters of the modules expected next back in the
      background while a module runs (the order is learned from the forward
      passes: which module ran after which), at most ``lookahead`` modules
      and half the budget ahead."""

    def __init__(self, budget: Size = "1G", min_size: Size = 1 << 20, manage_1d: bool = False,
                 layer_types: Optional[Sequence[Type[nn.Module]]] = None, max_spill: Optional[Size] = None,
                 codec: str = "zstd", spill_dir: Optional[str] = None, prefetch: bool = True,
                 lookahead: int = 2):
        if lookahead < 0:
            raise ValueError(f"lookahead must be 0 or more, not {lookahead}")
        self.prefetch = bool(prefetch)
        self.lookahead = int(lookahead)
        self.budget = parse_size(budget)
        self.min_size = parse_size(min_size) if min_size else 0
        self.manage_1d = manage_1d
        self.layer_types = tuple(layer_types) if layer_types else None
        self.max_spill = parse_size(max_spill) if max_spill is not None else None
        if codec not in ("zstd", "raw"):
            raise ValueError(f"codec '{codec}' is not zstd or raw")
        self.codec = codec
        self.spill_dir = spill_dir


# Presets: keyword overrides of MemoryConfig; the budget is a fraction of
# the managed parameters' size unless given.
PRESETS: Dict[str, Dict[str, Any]] = {
    "low_memory": {"fraction": 0.25, "codec": "zstd", "manage_1d": False, "min_size": 256 << 10},
    "speed": {"fraction": 0.75, "codec": "raw", "manage_1d": False, "min_size": 4 << 20},
}

_CHUNK = 64 << 10


class OffloadManager:
    """Large parameters of a live model in managed memory (see ``offload``)."""

    def __init__(self, model: nn.Module, config: MemoryConfig):
        self.model = model
        self.config = config
        chosen: List[Tuple[str, str, nn.Module, str, torch.nn.Parameter]] = []
        self.skipped: List[str] = []  # large parameters left alone: not in host memory
        for mname, m in model.named_modules():
            if config.layer_types and not isinstance(m, config.layer_types):
                continue
            for pname, p in m.named_parameters(recurse=False):
                nbytes = p.numel() * p.element_size()
                if nbytes < max(config.min_size, 1) or (p.dim() <= 1 and not config.manage_1d):
                    continue
                full = f"{mname}.{pname}" if mname else pname
                if p.device.type != "cpu":
                    self.skipped.append(full)  # managed memory is host memory
                    elsewhere = p.device
                    continue
                chosen.append((mname, pname, m, full, p))
        if self.skipped and not chosen:
            raise ValueError(f"offload manages parameters in host memory, and the large ones are on "
                             f"{elsewhere} (e.g. '{self.skipped[0]}'): offload before "
                             "moving the model to the GPU, or stream a bundle to the GPU with "
                             "Bundle.state_dict(device='cuda')")
        self._layout: List[Tuple[str, str, nn.Module, str, int, int]] = []
        offset = 0
        for mname, pname, m, full, p in chosen:
            nbytes = p.numel() * p.element_size()
            self._layout.append((mname, pname, m, full, offset, nbytes))
            offset += (nbytes + _CHUNK - 1) // _CHUNK * _CHUNK
        self.managed_bytes = offset
        if config.max_spill is not None and offset > config.budget + config.max_spill:
            raise ValueError(f"offloading {offset} bytes under a budget of {config.budget} could spill "
                             f"{offset - config.budget} bytes, over max_spill={config.max_spill}")
        self._region = None
        # Per module (in registration order): its managed byte ranges.
        self._ranges: Dict[str, List[Tuple[int, int]]] = {}
        for mname, _, _, _, off, nbytes in self._layout:
            self._ranges.setdefault(mname, []).append((off, nbytes))
        self._bytes = {k: sum(n for _, n in v) for k, v in self._ranges.items()}
        # Which module ran after which (learned; registration order until then).
        order = list(self._ranges)
        self._next: Dict[str, str] = {a: b for a, b in zip(order, order[1:] + order[:1])}
        self._last: Optional[str] = None
        self._handles: List[Any] = []
        if offset == 0:
            return
        self._region = _native.Region(offset, config.budget, config.spill_dir or "", config.codec)
        self._buffer = memoryview(self._region.buffer())
        for mname, pname, m, full, off, nbytes in self._layout:
            p = m._parameters[pname]
            with torch.no_grad():
                flat = torch.frombuffer(self._buffer, dtype=p.dtype, count=p.numel(), offset=off)
                t = flat.view(p.shape)
                t.copy_(p.detach())
            newp = nn.Parameter(t, requires_grad=p.requires_grad)
            m._parameters[pname] = newp
        # The old parameter storage goes when nothing refers to it any more.
        if config.prefetch and config.lookahead > 0 and len(order) > 1:
            modules = dict(model.named_modules())
            for name in order:
                self._handles.append(modules[name].register_forward_pre_hook(self._pre_hook(name)))

    def _pre_hook(self, name: str):
        def hook(_module, _inputs):
            if self._last is not None and self._last != name:
                self._next[self._last] = name
            self._last = name
            self._prefetch_after(name)
        return hook

    def _prefetch_after(self, name: str) -> None:
        # The next modules, while they fit in half the budget beside this one.
        room = self.config.budget // 2 - self._bytes[name]
        k = name
        for _ in range(self.config.lookahead):
            k = self._next.get(k)
            if k is None or k == name or self._bytes[k] > room:
                break
            room -= self._bytes[k]
            for off, n in self._ranges[k]:
                self._region.prefetch(off, n)

    def _module_ranges(self, module: Optional[str]) -> List[Tuple[int, int]]:
        if module is None:
            return [r for v in self._ranges.values() for r in v]
        key = "" if module == "<root>" else module
        if key not in self._ranges:
            raise KeyError(f"module '{module}' has no managed parameters (managed: {sorted(self._ranges)[:8]})")
        return self._ranges[key]

    def prefetch(self, module: Optional[str] = None) -> None:
        """Starts reading a module's managed parameters back in the background
        (all of them for None); returns at once."""
        for off, n in self._module_ranges(module):
            self._region.prefetch(off, n)

    def evict(self, module: Optional[str] = None) -> None:
        """Spills a module's managed parameters now (all of them for None);
        they come back on touch."""
        for off, n in self._module_ranges(module):
            self._region.evict(off, n)

    @property
    def managed(self) -> List[str]:
        """Names of the managed parameters."""
        return [full for _, _, _, full, _, _ in self._layout]

    def summary(self) -> Dict[str, Any]:
        """Managed and resident bytes, spill and fault counters, and per module
        (by name, '<root>' for the model itself) where its managed
        parameters are: managed_bytes, resident_bytes, spilled_bytes (only
        on disk), stored_bytes (their size in the spill file), zero_bytes
        (never written), faults and evictions."""
        st = self._region.stats() if self._region else {}
        per: Dict[str, Dict[str, int]] = {}
        for mname, _, _, _, off, nbytes in self._layout:
            m = per.setdefault(mname or "<root>", {"managed_bytes": 0, "resident_bytes": 0, "spilled_bytes": 0,
                                                   "stored_bytes": 0, "zero_bytes": 0, "faults": 0,
                                                   "evictions": 0})
            m["managed_bytes"] += nbytes
            for k, v in self._region.usage(off, nbytes).items():
                m[k] += v
        return {
            "managed_parameters": len(self._layout),
            "skipped_parameters": list(self.skipped),
            "managed_bytes": self.managed_bytes,
            "budget_bytes": self.config.budget,
            "resident_bytes": st.get("resident_bytes", 0),
            "peak_resident_bytes": st.get("peak_resident_bytes", 0),
            "spilled_bytes": st.get("bytes_spilled", 0),
            "spill_file_bytes": st.get("spill_file_bytes", 0),
            "faults": st.get("loads", 0) - st.get("prefetched", 0) + st.get("zero_fills", 0),
            "prefetched": st.get("prefetched", 0),
            "evictions": st.get("spills", 0) + st.get("clean_drops", 0) + st.get("zero_drops", 0),
            "compression_ratio": st.get("compression_ratio", 0.0),
            "per_module": per,
        }

    def cleanup(self) -> None:
        """Moves the managed parameters back into ordinary memory and frees
        the managed region and its spill file."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._ranges = {}
        for mname, pname, m, full, off, nbytes in self._layout:
            p = m._parameters[pname]
            m._parameters[pname] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        self._layout = []
        self._buffer = None
        self._region = None

    def __enter__(self) -> "OffloadManager":
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()


def offload(model: nn.Module, budget: Optional[Size] = None, preset: Optional[str] = None,
            config: Optional[MemoryConfig] = None, **kwargs) -> OffloadManager:
    """Moves a live model's large parameters into managed memory: at most
    ``budget`` bytes of them stay resident, the rest is compressed and spilled
    to disk and comes back on touch. One-dimensional parameters stay resident
    unless ``manage_1d=True``. ``preset`` is 'low_memory' or 'speed'; other
    keywords are MemoryConfig's (``prefetch=True``, ``lookahead=2``: the
    next modules' parameters are read back while one runs). Returns the
    manager (``summary()``, ``prefetch(module)``, ``evict(module)``,
    ``cleanup()``)."""
    if config is None:
        opts: Dict[str, Any] = {}
        fraction = None
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset '{preset}' is not one of {sorted(PRESETS)}")
            opts = dict(PRESETS[preset])
            fraction = opts.pop("fraction")
        opts.update(kwargs)
        if budget is None:
            if fraction is None:
                raise ValueError("offload needs a budget (or a preset)")
            total = sum(p.numel() * p.element_size() for p in model.parameters())
            budget = max(int(total * fraction), 2 * _CHUNK)
        config = MemoryConfig(budget=budget, **opts)
    return OffloadManager(model, config)


def _tensor_bytes(t: torch.Tensor):
    t = t.detach().cpu().contiguous()
    if t.dtype not in _TORCH_TO_FL:
        raise ValueError(f"dtype {t.dtype} cannot be stored in a bundle")
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy()


def save(obj: Union[nn.Module, Dict[str, torch.Tensor]], path: str, model_name: str = "model",
         metadata: Optional[Dict[str, Any]] = None, signature: Optional[Dict[str, Any]] = None,
         config: Optional[Dict[str, Any]] = None, version: str = "", codec: str = "zstd",
         level: int = 3, min_ratio: float = 1.0) -> Dict[str, Any]:
    """Writes a bundle straight from torch tensors (every dtype, bf16 too).

    obj: a module (its state_dict) or a state dict. metadata: author,
    license, description go to their fields, everything else to extra (as
    strings). signature: {'inputs': [{'name', 'dtype', 'shape'}], 'outputs': [...]}
    with dtypes as faultline names ('f32') and None or a name for a dynamic
    dimension. config: stored as the 'config' JSON blob (default: the
    module's ``config`` attribute if it has ``to_dict()``). min_ratio: a
    frame is stored compressed only if it shrinks that many times, verbatim
    (faster to load) otherwise; 1.0 keeps any saving."""
    if isinstance(obj, nn.Module):
        sd = obj.state_dict()
        if config is None and hasattr(obj, "config") and hasattr(obj.config, "to_dict"):
            config = obj.config.to_dict()
    else:
        sd = obj
    b = _native.Builder()
    m = b.add_model(model_name)
    if version:
        b.set_version(m, version)
    md = dict(metadata or {})
    b.set_info(m, str(md.pop("author", "")), str(md.pop("license", "")), str(md.pop("description", "")))
    for k, v in md.items():
        b.set_metadata(m, str(k), v if isinstance(v, str) else json.dumps(v))
    if signature:
        b.set_signature(m, signature)
    if config is not None:
        b.add_blob(m, "config", "config", "application/json", json.dumps(config, sort_keys=True).encode())
    seen = {}
    for name, t in sd.items():
        if not isinstance(t, torch.Tensor):
            continue
        data = _tensor_bytes(t)
        b.add_tensor(m, name, _TORCH_TO_FL[t.dtype], [int(s) for s in t.shape], data if len(data) else b"",
                     codec, level, False, float(min_ratio))
        seen[name] = data  # kept alive until build
    return b.build(str(path))
