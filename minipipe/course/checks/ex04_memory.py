"""Exercise 4: peak activation memory per rank, predicted and then checked on real ranks."""

from __future__ import annotations

from collections.abc import Callable

from ...schedules import gpipe, one_f_one_b
from .common import (
    CheckFailed,
    _call,
    _close,
    _label,
    _mlp_job,
    _number,
    _passed,
    _sequence,
    _train,
)

_MEM_CASES = [("gpipe", 4, 8, 100), ("1f1b", 4, 8, 100), ("1f1b", 4, 2, 100), ("1f1b", 2, 4, 3000),
              ("gpipe", 2, 1, 7), ("1f1b", 1, 5, 10), ("1f1b", 8, 3, 1), ("gpipe", 3, 5, 64)]


def _peak_reference(name: str, p: int, m: int, per_mb: float) -> list[float]:
    if name == "gpipe":
        return [m * per_mb] * p
    return [min(p - r, m) * per_mb for r in range(p)]


def _peak_values(fn: Callable, name: str, p: int, m: int, per_mb: int) -> list[float]:
    __tracebackhide__ = True
    args = {"schedule_name": name, "p": p, "m": m, "bytes_per_mb": per_mb}
    label = _label(fn, args)
    got = _sequence(_call(fn, args), label, f"a list with one number per rank (p={p} numbers)")
    if len(got) != p:
        raise CheckFailed(f"{label} returned {len(got)} value(s): return one per rank, p={p}")
    return [_number(v, f"{label}[{r}]") for r, v in enumerate(got)]


def check_peak_activation(fn: Callable[[str, int, int, int], list[int]]) -> None:
    """``fn(schedule_name, p, m, bytes_per_mb)``: peak activation bytes per rank (no recompute)."""
    __tracebackhide__ = True
    _peak_cases(fn)
    _passed(f"peak_activation matches GPipe and 1F1B on {len(_MEM_CASES)} cases (m < p included)")


def _peak_cases(fn: Callable) -> None:
    __tracebackhide__ = True
    for name, p, m, b in _MEM_CASES:
        got = _peak_values(fn, name, p, m, b)
        want = _peak_reference(name, p, m, b)
        if all(_close(g, w) for g, w in zip(got, want)):
            continue
        label = _label(fn, {"schedule_name": name, "p": p, "m": m, "bytes_per_mb": b})
        shown = f"{label} returned {[round(g, 6) for g in got]}"

        def same(values: list[float], got: list[float] = got) -> bool:
            return all(_close(g, float(v)) for g, v in zip(got, values))

        if b != 1 and same([w / b for w in want]):
            raise CheckFailed(f"{shown}: these are micro-batch counts; the function returns bytes "
                              "(count × bytes_per_mb)")
        if name == "1f1b":
            if same([m * b] * p) and p > 1:
                why = ("your 1F1B prediction is GPipe's (m micro-batches on every rank). 1F1B "
                       "starts backwards early, and each backward frees a micro-batch: how many "
                       "can rank r have started when its first backward arrives?")
            elif same([(p - r) * b for r in range(p)]):
                why = (f"rank 0 would hold {p} micro-batches, but this step only has m={m}: a "
                       "rank cannot hold more micro-batches than there are")
            elif (same([min(p - r - 1, m) * b for r in range(p)])
                  or same([(p - r - 1) * b for r in range(p)])):
                why = ("that counts the warm-up forwards only. At the peak a rank also holds the "
                       "micro-batch whose forward it has just run in the steady phase, before "
                       "the next backward frees one; and the last rank holds one, not zero")
            elif same([min(r + 1, m) * b for r in range(p)]):
                why = ("the ranks are the wrong way round: which rank receives its first "
                       "gradient soonest, and which one waits longest?")
            else:
                why = ("not 1F1B's peak. Walk through rank r's order (warm-up, steady, "
                       "cool-down), add one for each F, subtract one for each B, keep the maximum")
        else:
            if same([min(p - r, m) * b for r in range(p)]):
                why = ("that is 1F1B's peak. GPipe runs every forward before any backward: how "
                       "many micro-batches does a rank hold when its last forward is done?")
            else:
                why = ("not GPipe's peak. GPipe runs every forward before any backward: how many "
                       "micro-batches does a rank hold when its last forward is done?")
        raise CheckFailed(f"{shown}, expected something else: {why}")


def check_peak_activation_on_ranks(fn: Callable[[str, int, int, int], list[int]], p: int = 2,
                                   m: int = 4) -> dict[str, list[dict[str, int]]]:
    """Compare ``fn``'s prediction with the peak measured on ``p`` real ranks (GPipe and 1F1B).

    Each rank's bytes per micro-batch is measured (stages differ: the first holds the input
    layer, the last the loss), and ``fn(name, p, m, bytes_of_that_rank)[rank]`` must equal the
    rank's measured peak (``RunResult.peak_activation_bytes``, exact on CPU).

    Returns:
        ``{schedule_name: [{"rank", "bytes_per_mb", "predicted", "measured"}, ...]}``.
    """
    __tracebackhide__ = True
    _peak_cases(fn)  # wrong on paper: fail before starting any process
    model, loss_fn, batch = _mlp_job(m)
    table: dict[str, list[dict[str, int]]] = {}
    for name, make in (("gpipe", gpipe), ("1f1b", one_f_one_b)):
        result = _train(model, loss_fn, make(p, m), batch)
        rows = []
        for r in range(p):
            per_mb = result.activation_bytes_per_mb[r][0]
            predicted = _peak_values(fn, name, p, m, per_mb)[r]
            measured = result.peak_activation_bytes[r]
            rows.append({"rank": r, "bytes_per_mb": per_mb, "predicted": int(predicted),
                         "measured": measured})
            if not _close(predicted, measured):
                raise CheckFailed(
                    f"{name}, p={p}, m={m}: rank {r} measured a peak of {measured} bytes on real "
                    f"ranks ({per_mb} per micro-batch), your function predicts {predicted:g}")
        table[name] = rows
    for name, rows in table.items():
        print(f"{name}: " + "; ".join(f"rank {x['rank']} predicted {x['predicted']} B, measured "
                                      f"{x['measured']} B" for x in rows))
    _passed(f"predictions equal the peaks measured on {p} real ranks for GPipe and 1F1B")
    return table


