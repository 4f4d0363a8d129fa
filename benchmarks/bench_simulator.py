"""How fast schedules are generated, validated and simulated at cluster sizes (one core).

For each case: time ``make_schedule`` (generate), ``validate`` (completeness, local order,
channel order and the dry run) and ``simulate`` (checks, event loop and the timeline's figures;
the ``Event`` objects are built only when asked for), one after the other on a fresh schedule,
the run with the smallest sum of ``--repeat`` counting, CPU time (``time.process_time``: it
suffers less than the wall clock when other programs share the cores; the wall clock is shown
too). The simulated
step time is checked against :mod:`minipipe.formulas` where a closed form exists, so a fast
but wrong simulator fails here. Costs: ``t_f = t_b = t_w = 1`` per rank and micro-batch
(``1/v`` a chunk; DualPipe's chunks are whole stages of its two pipelines, so ``1`` each).

Run::

    python benchmarks/bench_simulator.py            # p=64, m=1024
    python benchmarks/bench_simulator.py --large    # p=256, m=4096
    python benchmarks/bench_simulator.py --quick    # small sizes, a smoke test for CI

Every schedule of ``minipipe.schedules.SCHEDULES`` except the naive and GPipe ones is timed
(interleaved with ``v = 4``), so schedules added there are benchmarked too.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from typing import Callable

from minipipe import formulas, make_schedule, simulate, validate
from minipipe.schedules import SCHEDULES


def timed(fn: Callable[[], object]) -> tuple[float, float, object]:
    """(CPU seconds, wall seconds, result) of one call."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.process_time() - c, time.perf_counter() - w, out


def bench(name: str, p: int, m: int, repeat: int) -> dict:
    """Generate, validate and simulate one schedule from scratch, ``repeat`` times; the run
    with the smallest CPU sum counts. Each run starts from nothing: whatever ``validate``
    computes and keeps on the schedule (its integer columns) is paid inside that run."""
    v = 4 if name == "interleaved" else 1
    best = None
    for _ in range(repeat):
        gc.collect()
        gen, gen_wall, schedule = timed(
            lambda: make_schedule(name, p, m, v) if v > 1 else make_schedule(name, p, m))
        w = schedule.v / schedule.pipelines  # chunks of one micro-batch's path per rank
        val, val_wall, _ = timed(lambda: validate(schedule))  # noqa: B023
        sim, sim_wall, timeline = timed(lambda: simulate(schedule, 1 / w, 1 / w, 1 / w))  # noqa: B023
        run = (gen + val + sim, gen, val, sim, gen_wall + val_wall + sim_wall, schedule, timeline)
        best = run if best is None or run[0] < best[0] else best
        del schedule, timeline, run
    _, gen, val, sim, wall, schedule, timeline = best
    v = schedule.v
    try:
        want = formulas.step_time(name, p, m, 1, 1, 1, v=v)
    except ValueError:
        want = None  # no closed form in formulas for this schedule
    if want is not None and abs(timeline.step_time - want) > 1e-6 * want:
        sys.exit(f"{name}: simulated step {timeline.step_time} != closed form {want}")
    return {"schedule": name, "p": p, "m": m, "v": v,
            "actions": sum(len(order) for order in schedule.ranks),
            "gen": gen, "validate": val, "simulate": sim,
            "wall": wall, "checked": want is not None,
            "bubble": timeline.bubble_fraction}


def warm_up() -> float:
    """Wall seconds of the first simulate in this process: numba compiling the event loops
    (or loading them from its cache on disk, after the first run on a machine)."""
    w = time.perf_counter()
    simulate(make_schedule("zb-h1", 2, 2), 1, 1, 1)
    return time.perf_counter() - w


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    size.add_argument("--large", action="store_true", help="p=256, m=4096")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; the best counts")
    args = parser.parse_args(argv)
    p, m = (8, 64) if args.quick else (256, 4096) if args.large else (64, 1024)
    repeat = 1 if args.quick or args.large else args.repeat
    names = [n for n in SCHEDULES if n not in ("naive", "gpipe")]
    first = warm_up()
    rows = [bench(name, p, m, repeat) for name in names]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"generate / validate / simulate on Python {platform.python_version()}, "
          f"{platform.machine()}, best of {repeat}, CPU seconds; load average {load:.1f} "
          f"on {os.cpu_count()} cores (timings taken under load are not the machine's speed)")
    print(f"first call in this process (numba compiling the loops, or loading its disk cache; "
          f"not in the table): {first:.2f} s wall")
    print(f"{'schedule':<12} {'p':>3} {'m':>5} {'v':>2} {'actions':>8} {'generate':>9} "
          f"{'validate':>9} {'simulate':>9} {'CPU sum':>8} {'wall sum':>9} {'formula':>8} "
          f"{'bubble':>7}")
    for r in rows:
        print(f"{r['schedule']:<12} {r['p']:>3} {r['m']:>5} {r['v']:>2} {r['actions']:>8} "
              f"{r['gen']:>9.3f} {r['validate']:>9.3f} {r['simulate']:>9.3f} "
              f"{r['gen'] + r['validate'] + r['simulate']:>8.3f} {r['wall']:>9.3f} "
              f"{'ok' if r['checked'] else 'n/a':>8} {r['bubble']:>7.2%}")


    print("issue 18's target: CPU sum < 0.2 s per schedule at p=64, m=1024 on one core")


if __name__ == "__main__":
    main()
