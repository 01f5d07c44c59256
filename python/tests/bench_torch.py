"""Benchmark: a model four times the paging budget, loaded and run several ways
in one run, each in its own process (so peak RSS is its own):

  faultline   open(budget=model/4, policy='plan') + assign + PlanHooks
  faultline-v the same, the bundle saved with min_ratio=1.2 (these weights
              compress about 1.09x, so every frame is stored verbatim)
  torch.load  torch.load of a state dict + load_state_dict, fully resident
  safetensors safetensors.torch.load_file + load_state_dict (if installed)
  offload     torch.load, then faultline.torch.offload(model, budget=model/4):
              the live model's weights in managed memory, spilled to disk
              (its first pass is timed from the offload call)

Reported: time to the first forward pass (from nothing loaded to its
output), steady passes per second (median of 5), peak and final RSS, and ratios
against torch.load. Exit 77 where torch is missing."""
import os
import sys
import tempfile

try:
    import torch
except ImportError:
    print("skipped: no torch")
    sys.exit(77)

from bench_common import layer_stack_state_dict, run_child  # noqa: E402

WIDTH, LAYERS, BATCH = 2048, 16, 32  # 256 MiB of f32 weights

CHILD = r"""
torch.set_num_threads(2)
x = torch.randn(batch, width)
t0 = time.perf_counter()
model = skeleton()
if kind.startswith("faultline"):
    b = faultline.open(path, budget=size // 4, policy="plan")
    ft.assign(model, b.state_dict())
    hooks = ft.PlanHooks(model, b)
elif kind == "torch":
    ft.assign(model, torch.load(path))
elif kind == "offload":
    ft.assign(model, torch.load(path))
    t0 = time.perf_counter()
    mgr = ft.offload(model, budget=size // 4)
else:
    import safetensors.torch as st
    ft.assign(model, st.load_file(path))
with torch.no_grad():
    y = model(x)
first = time.perf_counter() - t0
if kind.startswith("faultline"):
    hooks.finish_recording()
passes = []
with torch.no_grad():
    for _ in range(5):
        t = time.perf_counter()
        model(x)
        passes.append(time.perf_counter() - t)
print(json.dumps({"first_s": first, "pass_s": statistics.median(passes),
                  "rss_mib": status_kib("VmHWM") / 1024, "rss_end_mib": status_kib("VmRSS") / 1024,
                  "checksum": float(y.double().sum())}))
"""


def main():
    sd = layer_stack_state_dict(WIDTH, LAYERS)
    with tempfile.TemporaryDirectory() as d:
        import faultline.torch as ft

        paths = {"faultline": os.path.join(d, "m.apbundle"), "faultline-v": os.path.join(d, "v.apbundle"),
                 "torch": os.path.join(d, "m.pt"), "offload": os.path.join(d, "m.pt"),
                 "safetensors": os.path.join(d, "m.safetensors")}
        ft.save(sd, paths["faultline"])
        ft.save(sd, paths["faultline-v"], min_ratio=1.2)
        torch.save(sd, paths["torch"])
        kinds = ["faultline", "faultline-v", "torch", "offload"]
        try:
            import safetensors.torch as st

            st.save_file(sd, paths["safetensors"])
            kinds.append("safetensors")
        except ImportError:
            pass
        res = {}
        for k in kinds:
            res[k] = run_child(CHILD, k, paths[k], WIDTH, LAYERS, BATCH)
    base = res["torch"]
    print(f"model {LAYERS} x {WIDTH}x{WIDTH} f32 = {LAYERS * WIDTH * WIDTH * 4 >> 20} MiB, faultline budget a quarter")
    print(f"{'loader':12} {'first pass s':>12} {'passes/s':>9} {'peak RSS MiB':>13} {'RSS at end':>11} "
          f"{'first vs torch':>15} {'passes/s vs torch':>18}")
    for k, r in res.items():
        print(f"{k:12} {r['first_s']:12.3f} {1 / r['pass_s']:9.1f} {r['rss_mib']:13.0f} {r['rss_end_mib']:11.0f} "
              f"{r['first_s'] / base['first_s']:15.2f} {base['pass_s'] / r['pass_s']:18.3f}")
    sums = {round(r["checksum"], 3) for r in res.values()}
    if len(sums) != 1:
        print("outputs differ:", {k: r["checksum"] for k, r in res.items()})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
