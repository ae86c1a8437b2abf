"""Peak memory of real training steps, for tests/test_planner*.py.

Single process (run in a fresh process by tests/test_planner.py):
    python memory_probe.py PACKAGE_DIR MICRO_BATCH SEQ_LEN [PLAN]  → JSON on stdout
the peak resident memory of training steps of a generated package (with the
activation checkpointing of its plan PLAN, if given), above the
memory before the model existed. The peak is that of steps 2 and 3 (VmHWM,
reset after step 1): the steady state that `forgec plan` estimates. The
caller sets MALLOC_MMAP_THRESHOLD_ so that glibc serves every tensor-sized
block with mmap and returns it when freed: resident memory then follows the
live tensors instead of the heap's high-water mark.

Per rank (`rank_peaks`, a worker for tests/dist_helpers.spawn): each rank of a
gloo process group trains a plan with the distributed trainer's own engine
(runtime.distributed.Engine: its FSDP2 sharding, pipeline schedule, gradient
clipping over the world and AdamW) and measures its own process the same way:
the peak of steps 2 and 3 above the resident size after the plan's process
groups exist and before its model is built. A rank runs several plans in a
row, each after a warm-up step at a small batch, so it sets glibc's mmap
threshold itself (mallopt) and to one page: no tensor then reuses heap
memory an earlier run freed.
"""

import gc
import json
import os
import sys

import torch

from forgec.runtime.package import import_package
from forgec.runtime.train import Settings, accumulate_gradients, make_optimizer


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


def mmap_tensors(threshold: int = 4096) -> None:
    """What MALLOC_MMAP_THRESHOLD_ does, from inside the process (glibc): every
    later block of `threshold` bytes or more is its own mapping, returned when
    freed. One page (the default here): every tensor of a page or more counts
    in the resident size exactly while it lives, and none reuses a heap block
    an earlier run freed (the single-process probe's 64 KiB leaves a model's
    many small shards to the heap)."""
    import ctypes

    M_MMAP_THRESHOLD = -3
    if not ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold):
        raise RuntimeError("mallopt(M_MMAP_THRESHOLD) failed")


def _batch(task, pkg, s):
    """One global batch of the run's task: random tokens in one packed document
    (text), or captioned images."""
    if task.vlm:
        from forgec.runtime.vision_data import CaptionData
        from forgec.runtime.vlm_task import image_geometry

        with torch.device("meta"):
            size, channels = image_geometry(task.new_model())
        return CaptionData(size, channels, s.seed).next_batch(s.batch_size)
    from forgec.runtime.data import Batch

    vocab = pkg.ModelConfig().vocab_size
    tokens = torch.randint(0, vocab, (s.batch_size, s.seq_len + 1))
    return Batch(tokens[:, :-1], tokens[:, 1:],
                 torch.zeros(s.batch_size, s.seq_len, dtype=torch.long))


def _engine(pkg_dir: str, plan: str, batch_size: int, seq_len: int | None):
    """A builder of the plan's engine (runtime.distributed.Engine) and its
    batch, after the process group's mesh for the plan exists (its
    communicators are the run's, not the model's)."""
    from forgec.runtime import distributed
    from forgec.runtime.package import import_package
    from forgec.runtime.train import resolve_settings

    pkg = import_package(pkg_dir)
    planmod = distributed.plan_module(pkg)
    cfg = planmod.PLANS[plan]
    s = resolve_settings({"batch_size": batch_size, "seq_len": seq_len, "steps": 3}, None)
    task = distributed.task_of(pkg, s)
    distributed.check_batch(cfg, s)
    layout = distributed.setup(cfg)
    batch = _batch(task, pkg, s)

    def make():
        return distributed.Engine(pkg, planmod, plan, layout, s, fresh=True, task=task)

    return make, batch


def rank_peaks(runs: list[dict], out_dir: str) -> int:
    """Each run ({"pkg", "plan", "batch_size", "seq_len", "warm_batch", "tag"}):
    one warm-up step at a small batch (kernels' and the process group's
    one-time buffers are not the plan's), then, from the resident size before
    the model is built, the peak of steps 2 and 3 of the run's batch; written
    to OUT_DIR/TAG.rankR.json, with the parameter elements the rank stores."""
    import torch.distributed as dist

    from forgec.runtime.distributed import teardown

    mmap_tensors()
    rank = int(os.environ["RANK"])
    try:
        for run in runs:
            torch.manual_seed(0)
            make, batch = _engine(run["pkg"], run["plan"], run["warm_batch"],
                                  8 if run["seq_len"] else None)
            make().step(batch, 1)
            make, batch = _engine(run["pkg"], run["plan"], run["batch_size"], run["seq_len"])
            gc.collect()
            dist.barrier()
            before = status_bytes("VmRSS")
            engine = make()
            for step in range(1, 4):
                if step == 2:  # steady state from the second step on (AdamW's moments exist)
                    reset_peak()
                engine.step(batch, step)
            peak = status_bytes("VmHWM")
            # parameter elements this rank stores: the local shards of FSDP's and
            # TP's DTensors (FSDP's padding excluded), whole tensors otherwise
            stored = sum((p.to_local() if hasattr(p, "to_local") else p).numel()
                         for part in engine.parts for p in part.parameters())
            del engine, make, batch
            gc.collect()
            dist.barrier()
            with open(os.path.join(out_dir, f"{run['tag']}.rank{rank}.json"), "w") as f:
                json.dump({"before": before, "peak": peak, "delta": peak - before,
                           "params": stored}, f)
    finally:
        teardown()
    return 0


def main() -> None:
    pkg_dir, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    plan = sys.argv[4] if len(sys.argv) > 4 else None
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
    if plan is not None:
        import importlib

        from forgec.runtime.parallel import apply_activation_checkpointing

        apply_activation_checkpointing(model, importlib.import_module(f"{pkg.__name__}.plan"),
                                       plan)
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
