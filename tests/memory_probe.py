"""Run by tests/test_planner.py in a fresh process: the peak resident memory of
training steps of a generated package, above the memory before the model existed.

Usage: python memory_probe.py PACKAGE_DIR MICRO_BATCH SEQ_LEN  → JSON on stdout.
The peak is that of steps 2 and 3 (VmHWM, reset after step 1): the steady state
that `forgec plan` estimates.

The caller sets MALLOC_MMAP_THRESHOLD_ so that glibc serves every tensor-sized
block with mmap and returns it when freed: resident memory then follows the
live tensors instead of the heap's high-water mark.
"""

import gc
import json
import sys

import torch

from runtime.package import import_package
from runtime.train import Settings, accumulate_gradients, make_optimizer


def status_bytes(field: str) -> int:
    """VmRSS (resident now) or VmHWM (the peak since the last reset) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident size (Linux)


def main() -> None:
    pkg_dir, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    pkg = import_package(pkg_dir)
    torch.manual_seed(0)
    # warm the kernels up on a tiny input: their one-time buffers are not the model's
    model = pkg.Transformer()
    tokens = torch.randint(0, 256, (1, 9))
    accumulate_gradients(model, tokens[:, :-1], tokens[:, 1:], torch.zeros(1, 8, dtype=torch.long))
    del model
    gc.collect()
    before = status_bytes("VmRSS")
    model = pkg.Transformer()
    optimizer = make_optimizer(model, Settings())
    tokens = torch.randint(0, 256, (batch, seq + 1))
    doc_ids = torch.zeros(batch, seq, dtype=torch.long)
    for step in range(3):
        if step == 1:  # steady state from the second step on (AdamW's moments exist)
            reset_peak()
        accumulate_gradients(model, tokens[:, :-1], tokens[:, 1:], doc_ids)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = status_bytes("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "delta": peak - before}))


if __name__ == "__main__":
    main()
