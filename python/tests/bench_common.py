"""Shared by the loader benchmarks (bench_torch.py, bench_gpu.py): the
layer stack they load, and each loader run in a child process of its own so
that its peak RSS and device memory are its own."""
import json
import subprocess
import sys

# Put in front of each benchmark's child code: the arguments, a reading of
# /proc/self/status and the model's skeleton.
PRELUDE = r"""
import json, statistics, sys, time, torch
from torch import nn
import faultline, faultline.torch as ft
def status_kib(field):
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the process
    # that forked this one (the parent holds the whole state dict).
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0
kind, path, width, layers, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
size = layers * (width * width + width) * 4
def skeleton():
    # No weights allocated: every loader puts its tensors in with ft.assign.
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width, device="meta"), nn.ReLU())]).eval()
"""


def layer_stack_state_dict(width, layers):
    """The state dict of `layers` x (Linear(width, width), ReLU), seed 0."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.ReLU())]).state_dict()


def run_child(code, kind, path, width, layers, batch, env=None):
    """Runs PRELUDE + code for one loader; its last line of output as JSON.
    Raises RuntimeError with the child's output when it fails."""
    out = subprocess.run([sys.executable, "-c", PRELUDE + code, kind, path, str(width), str(layers), str(batch)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed (exit {out.returncode}):\n{out.stdout}{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])
