"""Benchmark: a model four times the GPU budget, run on the GPU several ways in
one run, each in its own process (so its GPU memory and RSS are its own):

  resident    torch.load + model.cuda(): every weight on the GPU (the bound)
  faultline   open(path).state_dict(device='cuda', gpu_budget=model/4) +
              faultline.torch.assign: the GPU tier streams the weights
              through the budget by plan (GpuStreamHooks); mapped memory
              (GPU memory mapped under the weights while staged, copied
              from pinned host copies), the default
  faultline-managed  the same with memory='managed' (CUDA managed memory)
  copy        torch.load into pinned host memory, each Linear's weights
              copied to the GPU in its forward pre-hook and dropped after
              it: what a user writes by hand
  accelerate  torch.load + accelerate.cpu_offload(execution_device='cuda')
              (if installed)

Reported: time to the first forward pass (from nothing loaded to its output
on the host), steady passes per second (median of 10), the most weight bytes
on the GPU at once (resident: the model; faultline: the tier's
peak_device_resident; the others: torch's peak allocation), peak RSS, and
ratios against resident. Exit 77 without torch, a CUDA device or
faultline's GPU tier."""
import os
import sys
import tempfile

try:
    import torch
except ImportError:
    print("skipped: no torch")
    sys.exit(77)

import faultline  # noqa: E402
from bench_common import layer_stack_state_dict, run_child  # noqa: E402

if not (torch.cuda.is_available() and faultline.has_cuda()):
    print(f"skipped: needs a CUDA device and faultline's GPU tier ({faultline.cuda_describe()})")
    sys.exit(77)

WIDTH, LAYERS, BATCH = 4096, 16, 64  # 1 GiB of f32 weights

CHILD = r"""
torch.manual_seed(1)
x = torch.randn(batch, width).cuda()
torch.cuda.synchronize()
t0 = time.perf_counter()
model = skeleton()
sd = None
if kind.startswith("faultline"):
    memory = {"faultline": {}, "faultline-managed": {"memory": "managed"}}[kind]
    sd = faultline.open(path).state_dict(device="cuda", gpu_budget=size // 4, **memory)
    ft.assign(model, sd)
elif kind == "resident":
    ft.assign(model, torch.load(path))
    model.cuda()
elif kind == "copy":
    ft.assign(model, {k: v.pin_memory() for k, v in torch.load(path).items()})
    def pre(m, _inputs):
        m._host = {n: p.data for n, p in m.named_parameters(recurse=False)}
        for n, p in m.named_parameters(recurse=False):
            p.data = p.data.to("cuda", non_blocking=True)
    def post(m, _inputs, _output):
        for n, p in m.named_parameters(recurse=False):
            p.data = m._host[n]
    for m in model:
        if isinstance(m, nn.Linear):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
else:
    import accelerate
    ft.assign(model, torch.load(path))
    accelerate.cpu_offload(model, execution_device=torch.device("cuda"))
with torch.no_grad():
    y = model(x).cpu()
first = time.perf_counter() - t0
passes = []
with torch.no_grad():
    for _ in range(10):
        t = time.perf_counter()
        model(x)
        torch.cuda.synchronize()
        passes.append(time.perf_counter() - t)
if kind.startswith("faultline"):
    s = sd.gpu.stats()
    gpu_peak, extra = s["peak_device_resident"], {k: s[k] for k in ("to_device", "to_host", "discards", "decodes", "errors",
                                                                     "device_pages")}
elif kind == "resident":
    gpu_peak, extra = size, {}
else:
    gpu_peak, extra = torch.cuda.max_memory_allocated() - x.numel() * 4, {}
print(json.dumps({"first_s": first, "pass_s": statistics.median(passes), "gpu_mib": gpu_peak / 2**20,
                  "rss_mib": status_kib("VmHWM") / 1024, "checksum": float(y.double().sum()),
                  "extra": extra}))
"""


def main():
    sd = layer_stack_state_dict(WIDTH, LAYERS)
    with tempfile.TemporaryDirectory() as d:
        import faultline.torch as ft

        paths = {"faultline": os.path.join(d, "m.apbundle"), "resident": os.path.join(d, "m.pt")}
        ft.save(sd, paths["faultline"])
        torch.save(sd, paths["resident"])
        paths["faultline-managed"] = paths["faultline"]
        paths["copy"] = paths["accelerate"] = paths["resident"]
        kinds = ["resident", "faultline", "faultline-managed", "copy"]
        try:
            import accelerate  # noqa: F401

            kinds.append("accelerate")
        except ImportError:
            pass
        del sd
        res = {k: run_child(CHILD, k, paths[k], WIDTH, LAYERS, BATCH) for k in kinds}
    base = res["resident"]
    print(f"model {LAYERS} x {WIDTH}x{WIDTH} f32 = {LAYERS * WIDTH * WIDTH * 4 >> 20} MiB, GPU budget a quarter, "
          f"batch {BATCH}, {torch.cuda.get_device_name()}")
    print(f"{'loader':16} {'first pass s':>12} {'passes/s':>9} {'GPU MiB':>8} {'peak RSS MiB':>13} "
          f"{'first vs resident':>18} {'passes/s vs resident':>21}")
    for k, r in res.items():
        print(f"{k:16} {r['first_s']:12.3f} {1 / r['pass_s']:9.1f} {r['gpu_mib']:8.0f} {r['rss_mib']:13.0f} "
              f"{r['first_s'] / base['first_s']:18.2f} {base['pass_s'] / r['pass_s']:21.3f}")
    for k in ("faultline", "faultline-managed"):
        print(f"{k} tier stats:", res[k]["extra"])
    ref = base["checksum"]
    bad = {k: r["checksum"] for k, r in res.items() if abs(r["checksum"] - ref) > 1e-4 * max(1.0, abs(ref))}
    if bad:
        print("outputs differ from the resident run:", ref, bad)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
