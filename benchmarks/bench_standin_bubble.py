"""Measured bubble of GPipe and 1F1B on the fixed-time stand-in block, against the prediction.

The stand-in block (:func:`minipipe.models.stand_in`) sleeps ``t_f`` in forward and ``t_b`` in
backward instead of computing, so the measured timeline shows the schedule itself even with
more ranks than cores. Each row compares, for the last steps of a real run:

- the bubble as a share of the step, ``idle / (p · step time)``: measured; the closed form
  ``(p − 1)/(m + p − 1)`` (:mod:`minipipe.formulas`); and the simulator fed with each stage's
  measured mean F and B times (which include the runtime's per-action overhead);
- the bubble relative to useful work, ``idle / busy``: measured and ``(p − 1)/m``;
- the step time: measured and ``(m + p − 1)(t_f + t_b)``.

Basis: equal stages (one stand-in block each), ``t_b = 2 t_f``, gloo on CPU. The measured
bubble sits a little above the closed form: every message and every action adds overhead
that the formula does not count (the simulated column includes the action overhead only).

    python benchmarks/bench_standin_bubble.py          # p = 2, 4; m = 4, 8: 1–3 min on 2 cores
    python benchmarks/bench_standin_bubble.py --quick  # p = 2, m = 4: a smoke run (~10 s)
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from minipipe import formulas
from minipipe.models import stand_in
from minipipe.runtime import train
from minipipe.schedules import make_schedule
from minipipe.simulate import simulate


def measure(name: str, p: int, m: int, t_f: float, t_b: float, steps: int) -> dict:
    """Run ``steps`` steps on real ranks; figures averaged over the steps after the first."""
    schedule = make_schedule(name, p, m)
    width = 8
    data = (torch.randn(2 * m, width), torch.randn(2 * m, width))
    result = train(stand_in(p, width=width, t_f=t_f, t_b=t_b), F.mse_loss, schedule, data,
                   steps=steps, timeout=120)
    timelines = result.timelines()[1:] or result.timelines()  # step 0 includes warm-up
    events = [e for tl in timelines for e in tl.events]
    mean_f, mean_b = ([statistics.fmean(e.duration for e in events
                                        if e.rank == r and e.action.kind.value == kind)
                       for r in range(p)] for kind in "FB")  # per stage
    return {
        "name": name, "p": p, "m": m,
        "step": statistics.fmean(tl.step_time for tl in timelines),
        "step_formula": formulas.step_time(name, p, m, t_f, t_b),
        "fraction": statistics.fmean(tl.bubble_fraction for tl in timelines),
        "fraction_formula": formulas.bubble_fraction(p, m),
        "fraction_simulated": simulate(schedule, t_f=mean_f, t_b=mean_b).bubble_fraction,
        "overhead": statistics.fmean(tl.bubble_overhead for tl in timelines),
        "overhead_formula": formulas.bubble_overhead(p, m),
        "cores_note": result.info.get("ranks_exceed_cores", False),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="p=2, m=4 only, 2 steps (smoke run)")
    parser.add_argument("--t-f", type=float, default=0.02, help="forward sleep per stage (s)")
    parser.add_argument("--t-b", type=float, default=0.04, help="backward sleep per stage (s)")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    grid = [(2, 4)] if args.quick else [(2, 4), (2, 8), (4, 4), (4, 8)]
    steps = 2 if args.quick else args.steps
    start = time.perf_counter()
    print(f"stand-in block: t_f = {args.t_f * 1e3:g} ms, t_b = {args.t_b * 1e3:g} ms per stage; "
          f"figures averaged over steps 2..{steps}")
    header = (f"{'schedule':<9}{'p':>3}{'m':>3} | {'step ms':>8}{'formula':>9} | "
              f"{'bubble of step: measured':>25}{'formula':>9}{'simulated':>10} | "
              f"{'of work: measured':>18}{'formula':>9}")
    print(header)
    print("-" * len(header))
    for p, m in grid:
        for name in ("gpipe", "1f1b"):
            r = measure(name, p, m, args.t_f, args.t_b, steps)
            print(f"{name:<9}{p:>3}{m:>3} | "
                  f"{r['step'] * 1e3:>8.1f}{r['step_formula'] * 1e3:>9.1f} | "
                  f"{r['fraction']:>25.1%}{r['fraction_formula']:>9.1%}"
                  f"{r['fraction_simulated']:>10.1%} | "
                  f"{r['overhead']:>18.1%}{r['overhead_formula']:>9.1%}"
                  + ("  (more ranks than cores)" if r["cores_note"] else ""))
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
