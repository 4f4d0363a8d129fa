"""How fast :func:`minipipe.simulate.simulate` plays large schedules (pure Python, one core).

For each case: build the schedule once, then time ``simulate(schedule)`` (checks, event loop
and the ``Event`` objects) with ``time.perf_counter``, best of ``--repeat`` runs; the CPU time
of the same runs (``time.process_time``) is shown too, as it suffers less when other programs
share the cores. The step time
and bubble of each result are checked against :mod:`minipipe.formulas`, so a fast but wrong
simulator fails here too.

Run::

    python benchmarks/bench_simulator.py            # p=64, m=1024: 1F1B and interleaved v=4
    python benchmarks/bench_simulator.py --quick    # small sizes, a smoke test for CI
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

from minipipe import formulas, make_schedule, simulate


def bench(name: str, p: int, m: int, v: int, repeat: int) -> dict:
    """Time ``simulate`` on one schedule, costs ``t_f = 1, t_b = 2`` per rank (``t/v`` a chunk)."""
    schedule = make_schedule(name, p, m, v)
    actions = sum(len(order) for order in schedule.ranks)
    best = best_cpu = float("inf")
    timeline = None
    for _ in range(repeat):
        timeline = None  # free the previous result outside the timed region
        start, start_cpu = time.perf_counter(), time.process_time()
        timeline = simulate(schedule, t_f=1 / v, t_b=2 / v)
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    assert timeline is not None
    want = formulas.step_time(name, p, m, 1, 2, v=v)
    if abs(timeline.step_time - want) > 1e-6 * want:
        sys.exit(f"{name}: simulated step {timeline.step_time} != closed form {want}")
    return {"schedule": name, "p": p, "m": m, "v": v, "actions": actions, "best_s": best,
            "cpu_s": best_cpu, "us_per_action": 1e6 * best / actions,
            "bubble": timeline.bubble_fraction}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case; the best counts")
    args = parser.parse_args(argv)
    p, m = (8, 64) if args.quick else (64, 1024)
    cases = [("1f1b", p, m, 1), ("interleaved", p, m, 4)]
    rows = [bench(*case, repeat=2 if args.quick else args.repeat) for case in cases]
    print(f"simulate() on Python {platform.python_version()}, {platform.machine()}, "
          f"best of {2 if args.quick else args.repeat} runs")
    print(f"{'schedule':<12} {'p':>3} {'m':>5} {'v':>2} {'actions':>8} {'best (s)':>9} "
          f"{'cpu (s)':>8} {'µs/action':>9} {'bubble':>7}")
    for r in rows:
        print(f"{r['schedule']:<12} {r['p']:>3} {r['m']:>5} {r['v']:>2} {r['actions']:>8} "
              f"{r['best_s']:>9.3f} {r['cpu_s']:>8.3f} {r['us_per_action']:>9.2f} "
              f"{r['bubble']:>7.2%}")


if __name__ == "__main__":
    main()
