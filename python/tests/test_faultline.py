"""The Python package: paged bundles as zero-copy torch/NumPy tensors, plans
recorded from a model's forward order, live models offloaded under a budget,
bundles saved from torch, DataLoader workers (fork), bad input."""
import json
import os
import subprocess
import time

import numpy as np
import pytest
import torch
from torch import nn

import faultline
import faultline.torch as ft


def mlp(width=512, layers=8, seed=0):
    torch.manual_seed(seed)
    mods = []
    for _ in range(layers):
        mods += [nn.Linear(width, width), nn.LayerNorm(width), nn.ReLU()]
    return nn.Sequential(*mods).eval()


@pytest.fixture
def saved(tmp_path):
    model = mlp()
    path = tmp_path / "mlp.apbundle"
    ft.save(model, path, model_name="mlp", metadata={"author": "tests", "license": "MIT", "epochs": 3},
            signature={"inputs": [{"name": "x", "dtype": "f32", "shape": ["batch", 512]}],
                       "outputs": [{"name": "y", "dtype": "f32", "shape": [None, 512]}]},
            config={"width": 512, "layers": 8})
    return model, str(path)


def test_every_dtype_round_trips_zero_copy(tmp_path):
    sd = {
        "f32": torch.randn(3, 5),
        "f64": torch.randn(7, dtype=torch.float64),
        "f16": torch.randn(4, 4).half(),
        "bf16": torch.randn(33, 17).bfloat16(),
        "i64": torch.arange(10),
        "i32": torch.arange(10, dtype=torch.int32),
        "i16": torch.arange(-5, 5, dtype=torch.int16),
        "i8": torch.arange(-5, 5, dtype=torch.int8),
        "u8": torch.arange(200, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "big": torch.randn(300, 1000),  # several frames
    }
    path = str(tmp_path / "all.apbundle")
    ft.save(sd, path)
    b = faultline.open(path, budget="256K")
    got = b.state_dict()
    assert sorted(got) == sorted(sd)
    for k, v in sd.items():
        assert got[k].dtype == v.dtype, k
        assert got[k].shape == v.shape, k
        assert torch.equal(got[k], v), k
    # Shared with the paged memory, not copied.
    buf = b.buffer("big")
    assert got["big"].data_ptr() == np.frombuffer(buf, dtype=np.uint8).__array_interface__["data"][0]
    arrays = b.numpy()
    assert np.array_equal(arrays["f32"], sd["f32"].numpy())
    assert arrays["bf16"].dtype == np.uint16  # NumPy has no bfloat16: raw bits
    assert np.array_equal(arrays["bf16"], sd["bf16"].view(torch.int16).numpy().view(np.uint16))
    assert not arrays["f32"].flags.writeable


def test_metadata_signature_config_and_errors(saved):
    _, path = saved
    b = faultline.open(path)
    assert b.models == ["mlp"]
    md = b.metadata()
    assert md["author"] == "tests" and md["license"] == "MIT" and md["extra"]["epochs"] == "3"
    sig = b.signature("mlp")
    assert sig["inputs"][0]["name"] == "x"
    assert b.config() == {"layers": 8, "width": 512}
    info = b.tensor_info("0.weight")
    assert info["dtype"] == "f32" and info["shape"] == [512, 512]
    with pytest.raises(FileNotFoundError, match="no model 'nope'"):
        b.state_dict("nope")
    with pytest.raises(FileNotFoundError, match="no tensor"):
        b.tensor("nope")
    with pytest.raises(ValueError, match="not a size"):
        faultline.open(path, budget="lots")
    with pytest.raises(ValueError, match="policy"):
        faultline.open(path, policy="fifo")
    with pytest.raises(FileNotFoundError):
        faultline.open(path + ".missing")


def test_not_a_bundle(tmp_path):
    p = tmp_path / "x.apbundle"
    p.write_bytes(b"this is not a bundle" * 100)
    with pytest.raises(OSError) as e:
        faultline.open(str(p))
    assert "x.apbundle" in str(e.value) and "header" in str(e.value)


def test_forward_over_paged_weights_a_quarter_of_the_model(saved):
    model, path = saved
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    b = faultline.open(path, budget=size // 4, policy="lru")
    twin = ft.assign(mlp(seed=1), b.state_dict())
    x = torch.randn(16, 512)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(twin(x), want)
        assert torch.equal(twin(x), want)
    st = b.stats()
    assert st["evictions"] > 0
    assert st["peak_resident_bytes"] <= st["budget_bytes"]
    # load_state_dict (a copy) works on the same dict too.
    copy = mlp(seed=2)
    copy.load_state_dict(b.state_dict())
    with torch.no_grad():
        assert torch.equal(copy(x), want)


def test_wide_layers_stream_in_huge_pages(tmp_path):
    model = mlp(width=1024, layers=6)  # 4 MiB weights: two whole huge pages each
    path = str(tmp_path / "wide.apbundle")
    ft.save(model, path)
    want = {k: v.numpy() for k, v in model.state_dict().items()}
    for huge in (True, False):
        b = faultline.open(path, budget="20M", huge_pages=huge)
        arrays = b.numpy()
        for _ in range(2):
            for k, a in arrays.items():
                assert np.array_equal(a, want[k]), k
        st = b.stats()
        assert st["errors"] == 0 and st["evictions"] > 0
        if not huge:
            assert not b.huge_units and st["huge_installs"] == 0
        elif b.huge_units:  # userfaultfd mode with THP and UFFDIO_MOVE
            assert st["huge_installs"] > 0


def test_plan_recorded_from_forward_hooks_drives_prefetch(saved):
    model, path = saved
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    b = faultline.open(path, budget=size // 4, policy="plan")
    twin = ft.assign(mlp(seed=1), b.state_dict())
    hooks = ft.PlanHooks(twin, b)
    x = torch.randn(4, 512)
    with torch.no_grad():
        want = model(x)
        assert torch.equal(twin(x), want)
        plan = hooks.finish_recording()
        assert plan[:2] == ["0.weight", "0.bias"]
        assert len(plan) == len(model.state_dict())
        # One step per module: a layer's weight and bias are used together.
        assert hooks.steps[:2] == [["0.weight", "0.bias"], ["1.weight", "1.bias"]]
        assert len(hooks.steps) == 16
        before = b.stats()["prefetched"]
        for _ in range(3):
            assert torch.equal(twin(x), want)
    assert b.stats()["prefetched"] > before
    hooks.remove()


def test_save_stores_frames_that_barely_compress_verbatim_on_request(tmp_path):
    sd = {"w": torch.nn.init.uniform_(torch.empty(512, 512))}  # compresses about 1.1x
    packed = ft.save(sd, str(tmp_path / "z.apbundle"))
    verbatim = ft.save(sd, str(tmp_path / "v.apbundle"), min_ratio=1.5)
    assert packed["stored_bytes"] < 512 * 512 * 4
    assert verbatim["stored_bytes"] == 512 * 512 * 4
    assert torch.equal(faultline.open(str(tmp_path / "v.apbundle")).tensor("w"), sd["w"])
    with pytest.raises(OSError, match="min_ratio"):
        ft.save(sd, str(tmp_path / "bad.apbundle"), min_ratio=0.5)


def test_a_plan_is_given_as_tensors_or_as_steps(saved):
    model, path = saved
    b = faultline.open(path, budget="1M", policy="plan")
    b.set_plan(["0.weight", "0.bias", ("mlp", "1.weight")])
    b.set_plan([["0.weight", "0.bias"], [("mlp", "1.weight"), "1.bias"], "3.weight"])
    with pytest.raises(FileNotFoundError, match="nope"):
        b.set_plan([["0.weight", "nope"]])
    b.advance("0.weight")
    assert torch.equal(b.tensor("0.weight"), model.state_dict()["0.weight"])


def test_offload_a_live_model_under_a_budget(tmp_path):
    model = mlp(width=512, layers=8)
    ref = mlp(width=512, layers=8)
    ref.load_state_dict(model.state_dict())
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    mgr = ft.offload(model, budget=total // 4, spill_dir=str(tmp_path))
    assert "0.weight" in mgr.managed
    assert "0.bias" not in mgr.managed  # one-dimensional parameters stay resident
    x = torch.randn(8, 512)
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), ref(x))
    s = mgr.summary()
    assert s["managed_parameters"] == 8
    assert s["peak_resident_bytes"] <= total // 4
    assert s["spilled_bytes"] > 0 and s["faults"] > 0 and s["evictions"] > 0
    per = s["per_module"]
    assert sorted(per, key=int) == [str(3 * i) for i in range(8)]  # the Linear layers
    for m in per.values():
        assert m["managed_bytes"] == 512 * 512 * 4
        assert m["resident_bytes"] + m["spilled_bytes"] + m["zero_bytes"] == m["managed_bytes"]
        assert m["zero_bytes"] == 0 and m["faults"] >= 16  # copied in at offload: every chunk written
    # (The evictor may still be running: only faults stand still between
    # the totals and the per-module figures.)
    assert sum(m["resident_bytes"] for m in per.values()) <= s["budget_bytes"]
    assert sum(m["faults"] for m in per.values()) == s["faults"]
    assert sum(m["evictions"] for m in per.values()) >= s["evictions"]
    # The pass ended in the last layer: it is in memory, the first one on disk.
    assert per["21"]["resident_bytes"] == 512 * 512 * 4
    assert per["0"]["spilled_bytes"] > 0 and 0 < per["0"]["stored_bytes"] <= per["0"]["spilled_bytes"]
    # Training still works on managed parameters.
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model(x).square().mean()
    loss.backward()
    opt.step()
    mgr.cleanup()
    assert mgr.summary()["managed_parameters"] == 0
    with torch.no_grad():
        model(x)


def test_offload_prefetches_the_next_modules_and_takes_hints(tmp_path):
    model = mlp(width=512, layers=8)
    ref = mlp(width=512, layers=8)
    ref.load_state_dict(model.state_dict())
    layer = 512 * 512 * 4
    mgr = ft.offload(model, budget=4 * layer, spill_dir=str(tmp_path))  # lookahead 2 by default
    x = torch.randn(8, 512)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(model(x), ref(x))
    s = mgr.summary()
    assert s["prefetched"] > 0  # read back ahead of the faults
    # Hints by module name: evict spills now, prefetch reads back in the background.
    mgr.evict("0")
    assert mgr.summary()["per_module"]["0"]["resident_bytes"] == 0
    mgr.prefetch("0")
    for _ in range(10000):
        if mgr.summary()["per_module"]["0"]["resident_bytes"] == layer:
            break
        time.sleep(0.001)
    u = mgr.summary()["per_module"]["0"]
    assert u["resident_bytes"] == layer
    faults = u["faults"]
    with torch.no_grad():
        assert torch.equal(model[0](x), ref[0](x))
    assert mgr.summary()["per_module"]["0"]["faults"] == faults  # nothing faulted: it was there
    mgr.evict()  # everything
    assert mgr.summary()["resident_bytes"] == 0
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    with pytest.raises(KeyError, match="no managed parameters"):
        mgr.prefetch("1")  # a LayerNorm: nothing managed there
    mgr.cleanup()
    assert not model[0]._forward_pre_hooks  # cleanup took the hooks away
    # Without prefetch: no hooks (the engine still reads ahead of sequential faults).
    mgr = ft.offload(model, budget=4 * layer, prefetch=False, spill_dir=str(tmp_path))
    assert not model[0]._forward_pre_hooks
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(model(x), ref(x))
    mgr.cleanup()
    with pytest.raises(ValueError, match="lookahead"):
        ft.offload(model, budget="1M", lookahead=-1)


def test_offload_presets_types_and_caps():
    model = mlp(width=256, layers=4)
    mgr = ft.offload(model, preset="low_memory")
    assert mgr.summary()["managed_parameters"] == 4
    mgr.cleanup()
    # Nothing large enough: nothing managed, and every call still works.
    mgr = ft.offload(model, budget="1M", min_size="64M")
    assert mgr.summary()["managed_parameters"] == 0 and mgr.summary()["per_module"] == {}
    mgr.prefetch()
    mgr.evict()
    with pytest.raises(KeyError, match="no managed parameters"):
        mgr.evict("0")
    mgr.cleanup()
    mgr = ft.offload(model, budget="1M", layer_types=[nn.LayerNorm], manage_1d=True, min_size=0)
    assert all(".weight" in n or ".bias" in n for n in mgr.managed)
    assert mgr.summary()["managed_parameters"] == 8
    mgr.cleanup()
    with pytest.raises(ValueError, match="max_spill"):
        ft.offload(model, budget="128K", max_spill="64K", min_size=0)
    with pytest.raises(ValueError, match="preset"):
        ft.offload(model, preset="fastest")
    # Parameters that are not in host memory (on a GPU, or meta) are not
    # managed; a model with nothing else is refused, naming the way out.
    with pytest.raises(ValueError, match="host memory.*meta.*'0.weight'"):
        ft.offload(mlp(width=256, layers=2).to("meta"), budget="1M", min_size=0)
    mixed = mlp(width=256, layers=2)
    mixed[3].to("meta")
    mgr = ft.offload(mixed, budget="1M", min_size=0)
    assert "0.weight" in mgr.managed and "3.weight" in mgr.summary()["skipped_parameters"]
    mgr.cleanup()
    with pytest.raises(ValueError, match="not a size"):
        ft.offload(model, budget="a lot")


class Rows(torch.utils.data.Dataset):
    def __init__(self, t):
        self.t = t

    def __len__(self):
        return self.t.shape[0]

    def __getitem__(self, i):
        return self.t[i].clone()


def test_dataloader_workers_read_paged_tensors(tmp_path):
    data = torch.randn(4096, 64)
    path = str(tmp_path / "data.apbundle")
    ft.save({"rows": data}, path)
    b = faultline.open(path, budget="128K")
    rows = b.tensor("rows")
    loader = torch.utils.data.DataLoader(Rows(rows), batch_size=256, num_workers=2,
                                         multiprocessing_context="fork")
    got = torch.cat(list(loader))
    assert torch.equal(got, data)


def test_unpack_writes_safetensors_that_load_back(tmp_path, saved):
    _, path = saved
    cli = os.environ.get("FAULTLINE_CLI")
    if not cli:
        pytest.skip("FAULTLINE_CLI not set")
    out = tmp_path / "out"
    subprocess.run([cli, "unpack", path, "-o", str(out)], check=True, capture_output=True)
    st = out / "mlp.safetensors"
    raw = st.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    b = faultline.open(path)
    for name in b.tensors():
        start, end = header[name]["data_offsets"]
        assert raw[8 + n + start:8 + n + end] == bytes(b.buffer(name))


def test_reference_safetensors_files_pack_bit_exactly_and_unpack_opens(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    cli = os.environ.get("FAULTLINE_CLI")
    if not cli:
        pytest.skip("FAULTLINE_CLI not set")
    sd = {"emb": torch.randn(1000, 64), "w": torch.randn(64, 64).bfloat16(), "ids": torch.arange(17),
          "mask": torch.tensor([True, False])}
    src = tmp_path / "ref.safetensors"
    st.save_file(sd, str(src))
    bundle = tmp_path / "ref.apbundle"
    subprocess.run([cli, "pack", str(src), "-o", str(bundle)], check=True, capture_output=True)
    b = faultline.open(str(bundle))
    for k, v in sd.items():
        assert torch.equal(b.tensor(k), v), k
    out = tmp_path / "out"
    subprocess.run([cli, "unpack", str(bundle), "-o", str(out)], check=True, capture_output=True)
    files = list(out.glob("*.safetensors"))
    assert len(files) == 1
    assert files[0].read_bytes() == src.read_bytes()  # the reference layout, byte for byte
    with safe_open(str(files[0]), framework="pt") as f:
        assert sorted(f.keys()) == sorted(sd)
        for k in f.keys():
            assert torch.equal(f.get_tensor(k), sd[k]), k
