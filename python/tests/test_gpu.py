"""The GPU tier from Python: bundles streamed through a GPU budget as torch
tensors (``Bundle.state_dict(device='cuda')``, ``faultline.open_gpu``,
``faultline.torch.assign``/``stream``). The streaming tests need the GPU
tier and a CUDA device and are skipped without them; the hook logic and the
errors are checked everywhere (the hooks against a recording stand-in for
the tier that serves the CPU paged tensors)."""
import errno
import os

import pytest
import torch
from torch import nn

import faultline
import faultline.torch as ft
from test_faultline import mlp

gpu = pytest.mark.skipif(not (faultline.has_cuda() and torch.cuda.is_available()),
                         reason="needs faultline's GPU tier and a CUDA device")


class Branches(nn.Module):
    """Runs its children in the reverse of their registration order, one of
    them twice, inside a module that owns a parameter of its own."""

    def __init__(self, width=64):
        super().__init__()
        torch.manual_seed(3)
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, width)
        self.third = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.randn(width))

    def forward(self, x):
        x = self.third(x).relu()
        x = self.second(x).relu()
        x = self.second(x).relu()
        return self.first(x) * self.scale


class RecordingTier:
    """Stands in for GpuBundle: serves the CPU paged tensors of a Bundle and
    records the plan and every begin/end, checking that they pair up."""

    def __init__(self, bundle):
        self.b = bundle
        self.device = 0
        self.events = []
        self.open = []
        self._plan = []

    def _model(self, model):
        return self.b._model(model)

    def tensors(self, model=None):
        return self.b.tensors(model)

    def tensor(self, name, model=None):
        return self.b.tensor(name, model)

    def set_plan(self, steps, model=None):
        assert not self.open, "plan changed while a step is begun"
        self._plan = [[(model, n) for n in step] for step in steps]
        self.events.append(("plan", [list(step) for step in steps]))

    @property
    def plan(self):
        return [list(step) for step in self._plan]

    def live(self):
        return {n for k in self.open for _, n in self._plan[k]}

    def begin(self, step, stream=None):
        assert 0 <= step < len(self._plan)
        self.open.append(step)
        self.events.append(("begin", step))

    def end(self, step, stream=None):
        assert step in self.open, f"end({step}) without begin"
        self.open.remove(step)
        self.events.append(("end", step))


@pytest.fixture
def branches(tmp_path):
    model = Branches().eval()
    path = str(tmp_path / "branches.apbundle")
    ft.save(model, path)
    return model, path


def test_stream_hooks_begin_each_module_step_around_its_forward(branches):
    model, path = branches
    tier = RecordingTier(faultline.open(path, budget="1M"))
    sd = faultline.StreamedStateDict(tier, None)
    paged = ft.assign(Branches().eval(), sd)
    hooks = paged.faultline_stream
    # Registration order first: the root's own parameter, then the children.
    assert tier.events[0] == ("plan", [["scale"], ["first.weight", "first.bias"], ["second.weight", "second.bias"],
                                       ["third.weight", "third.bias"]])
    # Every Linear finds its weights in a begun step when it runs.
    seen, checks = [], []
    for name in ("first", "second", "third"):
        def check(m, _inputs, name=name):
            assert f"{name}.weight" in tier.live(), f"{name} ran outside its step"
            seen.append(name)
        checks.append(getattr(paged, name).register_forward_pre_hook(check))
    x = torch.randn(4, 64)
    with torch.no_grad():
        want = model(x)
        for _ in range(2):
            assert torch.equal(paged(x), want)
            assert tier.open == []
    assert seen == ["third", "second", "second", "first"] * 2
    # After the first pass the plan follows the order modules really ran in.
    plans = [e[1] for e in tier.events if e[0] == "plan"]
    assert len(plans) == 2
    assert plans[1] == [["scale"], ["third.weight", "third.bias"], ["second.weight", "second.bias"],
                        ["first.weight", "first.bias"]]
    assert hooks.plan == plans[1]
    # The second pass begins steps in plan order: 0 (root), 1, 2, 2, 3.
    second = [e[1] for e in tier.events[tier.events.index(("plan", plans[1])):] if e[0] == "begin"]
    assert second == [0, 1, 2, 2, 3]
    for h in checks:
        h.remove()
    hooks.remove()
    n = len(tier.events)
    with torch.no_grad():
        paged(x)
    assert len(tier.events) == n


def test_plan_hooks_record_the_order_modules_run_in(branches):
    # The same ordering logic for the CPU pager's PlanHooks.
    model, path = branches
    b = faultline.open(path, budget="256K", policy="plan")
    paged = ft.assign(Branches().eval(), b.state_dict())
    hooks = ft.PlanHooks(paged, b)
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert torch.equal(paged(x), model(x))
        hooks.finish_recording()
        assert torch.equal(paged(x), model(x))
    assert hooks.steps == [["scale"], ["third.weight", "third.bias"], ["second.weight", "second.bias"],
                           ["first.weight", "first.bias"]]
    hooks.remove()


def test_a_failed_forward_leaves_no_step_begun(branches):
    model, path = branches
    tier = RecordingTier(faultline.open(path, budget="1M"))
    paged = ft.assign(Branches().eval(), faultline.StreamedStateDict(tier, None))
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            paged(torch.randn(4, 63))  # wrong width: the first Linear to run raises
        if ft._ALWAYS_CALL:
            assert tier.open == []  # torch >= 2.0 ran the hooks
        # The next pass ends what the failed one left begun, then runs right,
        # every module inside its step (the root's own parameter included).
        def root_check(_m, _inputs):
            assert "scale" in tier.live(), "the root's step is not begun when its forward starts"
        h = paged.register_forward_pre_hook(root_check)  # runs after the streaming pre-hooks
        x = torch.randn(4, 64)
        assert torch.equal(paged(x), model(x))
        h.remove()
        assert tier.open == []
        with pytest.raises(RuntimeError):
            paged(torch.randn(4, 63))
    paged.faultline_stream.remove()
    assert tier.open == []


def test_a_streamed_state_dict_refuses_to_be_read_outside_a_step(branches):
    _, path = branches
    tier = RecordingTier(faultline.open(path, budget="1M"))
    sd = faultline.StreamedStateDict(tier, None)
    assert sorted(sd) == sorted(Branches().state_dict())
    assert "first.weight" in sd and "nope" not in sd and len(sd) == 7
    with pytest.raises(RuntimeError, match="faultline.torch.assign"):
        sd["first.weight"]
    with pytest.raises(RuntimeError, match="streamed by the GPU tier"):
        Branches().load_state_dict(sd)
    with pytest.raises(KeyError):
        sd["nope"]
    with pytest.raises(KeyError, match="missing"):
        ft.stream(nn.Linear(64, 64), sd)
    with pytest.raises(TypeError):
        ft.stream(Branches(), {"first.weight": torch.zeros(64, 64)})


@pytest.mark.skipif(faultline.has_cuda(), reason="the GPU tier is available here")
def test_without_the_gpu_tier_opening_one_says_why(branches):
    _, path = branches
    with pytest.raises(OSError) as e:
        faultline.open_gpu(path)
    assert e.value.errno == errno.ENOTSUP
    assert faultline.cuda_describe()
    b = faultline.open(path)
    with pytest.raises(ValueError, match="gpu_budget"):
        b.state_dict(device="cuda", gpu_budget="1G")


def test_the_default_falls_back_to_managed_memory_only_where_mapped_memory_is_refused(branches, monkeypatch):
    # A stand-in for the native tier that refuses mapped memory as a device
    # without virtual memory management does ("" = what the environment says).
    _, path = branches
    opened = []
    manifest = faultline.open(path)._b.manifest()

    class Native:
        def __init__(self, *args):
            kind = args[-1]
            opened.append(kind)
            if kind == "mapped" or (kind == "" and os.environ.get("FAULTLINE_GPU_MEMORY") == "mapped"):
                raise OSError(errno.ENOTSUP, "device 0 has no virtual memory management, which mapped memory needs; "
                                             "use managed memory")

        def manifest(self):
            return manifest

        def device(self):
            return 0

    monkeypatch.setattr(faultline._native, "GpuBundle", Native)
    monkeypatch.delenv("FAULTLINE_GPU_MEMORY", raising=False)
    g = faultline.open_gpu(path)
    assert opened == ["mapped", "managed"] and "first.weight" in g.tensors()
    opened.clear()
    with pytest.raises(OSError, match="virtual memory management"):
        faultline.open_gpu(path, memory="mapped")  # asked for: no fallback
    assert opened == ["mapped"]
    opened.clear()
    monkeypatch.setenv("FAULTLINE_GPU_MEMORY", "mapped")
    with pytest.raises(OSError):
        faultline.open_gpu(path)  # set in the environment: no fallback either
    assert opened == [""]


def test_bad_gpu_options_are_refused(branches):
    _, path = branches
    with pytest.raises((ValueError, OSError)):
        faultline.open_gpu(path, gpu_budget="lots")
    with pytest.raises((ValueError, OSError)):
        faultline.open_gpu(path, eviction="sideways")
    with pytest.raises((ValueError, OSError)):
        faultline.open_gpu(path, memory="sideways")


@gpu
@pytest.mark.parametrize("memory", ["managed", "mapped"])
def test_a_model_four_times_the_gpu_budget_streams_and_matches_the_resident_run(tmp_path, memory):
    model = mlp(width=1024)
    path = str(tmp_path / "mlp.apbundle")
    ft.save(model, path)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    budget = size // 4
    b = faultline.open(path)
    sd = b.state_dict(device="cuda", gpu_budget=budget, lookahead=2, memory=memory)
    assert isinstance(sd, faultline.StreamedStateDict)
    t = sd.tensor("0.weight")
    assert t.is_cuda and t.dtype == torch.float32 and tuple(t.shape) == (1024, 1024)
    paged = ft.assign(mlp(width=1024, seed=1), sd)
    resident = model.cuda()
    x = torch.randn(16, 1024, device="cuda")
    with torch.no_grad():
        want = resident(x)
        for _ in range(3):
            got = paged(x)
            torch.cuda.synchronize()
            # Same weights, same kernels; cuBLAS may still pick another
            # algorithm for other pointers, hence a tolerance far below
            # what a wrong weight would give.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    s = sd.gpu.stats()
    assert s["to_device"] > 0 and s["decodes"] > 0
    assert s["peak_device_resident"] <= budget
    assert s["to_host"] + s["discards"] > 0  # the model does not fit: tensors left the GPU
    assert s["errors"] == 0
    assert (s["device_pages"] > 0) == (memory == "mapped")  # the 4 MiB weights are mapped
    b.close()


@gpu
def test_streaming_from_torch_maps_its_weights_unless_told_otherwise(tmp_path, monkeypatch):
    path = str(tmp_path / "mlp.apbundle")
    ft.save(mlp(width=1024), path)
    monkeypatch.delenv("FAULTLINE_GPU_MEMORY", raising=False)
    for env, mapped in ((None, True), ("managed", False)):
        if env:
            monkeypatch.setenv("FAULTLINE_GPU_MEMORY", env)
        with faultline.open_gpu(path, gpu_budget="8M") as g:
            g.set_plan([["0.weight"]])
            with g.step(0):
                w = g.tensor("0.weight")
                assert w.abs().sum().item() > 0
            torch.cuda.synchronize()
            assert (g.stats()["device_pages"] > 0) == mapped


@gpu
def test_open_gpu_serves_every_dtype_inside_a_step(tmp_path):
    sd = {"f32": torch.randn(3, 5), "bf16": torch.randn(33, 17).bfloat16(), "f16": torch.randn(4, 4).half(),
          "i64": torch.arange(10), "u8": torch.arange(200, dtype=torch.uint8), "bool": torch.tensor([True, False]),
          "empty": torch.zeros(0, 4)}
    path = str(tmp_path / "all.apbundle")
    ft.save(sd, path)
    with faultline.open_gpu(path) as g:
        names = [n for n in sd if sd[n].numel()]
        g.set_plan([names])
        with g.step(0):
            got = {n: g.tensor(n).clone() for n in sd}
        torch.cuda.synchronize()
    for n, v in sd.items():
        assert got[n].is_cuda and got[n].dtype == v.dtype and got[n].shape == v.shape, n
        assert torch.equal(got[n].cpu(), v), n
