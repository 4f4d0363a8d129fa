"""What the caller builds and ships before the first step, for 10 and 100 000 steps.

For each number of steps and each way of giving data (a list of batches made up front, the
old way; a loader, :func:`minipipe.loaders.per_step`, read on the ranks), and the model as an
``nn.Sequential`` or as layer specs: the caller's time from the call to the moment the
job is ready to launch (data and model prepared, every check done, the job pickled), its
resident-memory growth, and the bytes each rank is sent. Then one real 10-step run with
specs and a loader reports each rank's parameter bytes and peak RSS.

A list of batches grows linearly with the steps, so it is measured at 10 and 1 000 steps
only. The 100 000-step run itself is not started (nothing here stops a run after a few hundred
steps); what the ranks do per step does not depend on the number of steps: each reads its
batch when the step comes.

Run::

    python benchmarks/bench_ownership.py           # 10 and 100 000 steps
    python benchmarks/bench_ownership.py --quick   # 10 and 1 000 steps
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import cloudpickle
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe import make_schedule  # noqa: E402
from minipipe.loaders import as_loader, per_step  # noqa: E402
from minipipe.models import mlp, mlp_batch, mlp_specs  # noqa: E402
from minipipe.runtime import check_config, train  # noqa: E402
from minipipe.runtime.caller import split_evenly  # noqa: E402
from minipipe.runtime.job import Job  # noqa: E402

WIDTH, LAYERS, BATCH = 256, 8, 32


def batch(k: int):
    return mlp_batch(BATCH, d_in=WIDTH, d_out=WIDTH, seed=k)


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prepare(steps: int, lazy: bool, specs: bool) -> tuple[float, int, int]:
    """Seconds, peak-RSS growth and pickled job bytes up to the launch."""
    before, start = rss(), time.perf_counter()
    model = mlp_specs(LAYERS, WIDTH, WIDTH, WIDTH) if specs else mlp(LAYERS, WIDTH, WIDTH, WIDTH)
    data = per_step(batch) if lazy else [batch(k) for k in range(steps)]
    loader = as_loader(data, steps)
    sched = make_schedule("1f1b", 2, 4)
    check_config(model, sched, loader, 1, None)
    job = Job(model, F.mse_loss, sched, loader, split_evenly(len(model), 2))
    size = len(cloudpickle.dumps(job))
    return time.perf_counter() - start, rss() - before, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    big = 1_000 if args.quick else 100_000
    print(f"MLP {LAYERS} layers, width {WIDTH}, batch {BATCH}; 1F1B p=2 m=4")
    print(f"{'steps':>7} {'data':>8} {'model':>10} {'prepare s':>10} {'caller RSS +MiB':>16} "
          f"{'job bytes':>12}")
    prepare(10, True, True)  # warm-up: first imports and allocations
    for lazy in (True, False):  # the loader first: peak RSS only grows
        for specs in (True, False):
            # a list of 100 000 batches is 6.5 GB of tensors, pickled once more for the ranks
            # (measured once: 350 s, +19 GiB caller RSS): lists stop at 1 000 steps here
            for steps in (10, big if lazy else min(big, 1_000)):
                t, grew, size = prepare(steps, lazy, specs)
                print(f"{steps:>7} {'loader' if lazy else 'list':>8} "
                      f"{'specs' if specs else 'Sequential':>10} {t:>10.3f} {grew / 2**20:>16.1f} "
                      f"{size:>12,}")
    start = time.perf_counter()
    res = train(mlp_specs(LAYERS, WIDTH, WIDTH, WIDTH), F.mse_loss, make_schedule("1f1b", 2, 4),
                per_step(batch), steps=10)
    total = time.perf_counter() - start
    print(f"\nreal run, 10 steps, specs + loader: {total:.2f} s in all; first step "
          f"{res.step_times[0] * 1e3:.1f} ms, median {res.step_time * 1e3:.1f} ms")
    for r in sorted(res.ranks, key=lambda r: r["rank"]):
        print(f"  rank {r['rank']}: parameters {r['param_bytes'] / 2**20:.2f} MiB, "
              f"peak RSS {r['rss_peak_bytes'] / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
