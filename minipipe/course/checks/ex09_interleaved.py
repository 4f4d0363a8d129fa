"""Exercise 9: an interleaved 1F1B generator (Megatron-LM's virtual stages)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ...schedules import Action, Kind, Schedule, interleaved
from .common import CheckFailed, _how_far, _label, _orders, _passed, _schedule, _validated

# (p, m, v): m a multiple of p, as Megatron-LM requires; m == p included (there a rank may also
# run every forward first, as Megatron-LM does; both orders are accepted)
_INTERLEAVED_CASES = [(2, 4, 2), (4, 8, 2), (3, 6, 3), (2, 2, 2), (4, 4, 2), (2, 8, 4),
                      (1, 3, 2), (4, 12, 3), (3, 9, 2), (8, 16, 2)]


def _sequence_of(order: Sequence[Action], kind: Kind) -> list[tuple[int, int]]:
    return [(a.chunk, a.mb) for a in order if a.kind is kind]


def _warmup(order: Sequence[Action]) -> int:
    return next((k for k, a in enumerate(order) if a.kind is not Kind.F), len(order))


def _compose(fwd: list[Action], bwd: list[Action], warmup: int) -> tuple[Action, ...]:
    """One rank's order from its forwards and backwards: warm-up, one F one B, cool-down."""
    steady = len(fwd) - warmup
    out = list(fwd[:warmup])
    for k in range(steady):
        out += [fwd[warmup + k], bwd[k]]
    return tuple(out + list(bwd[steady:]))


def _groups_message(label: str, r: int, got: list[tuple[int, int]], p: int, m: int,
                    v: int) -> str | None:
    by_mb = [(k % v, k // v) for k in range(m * v)]  # chunk switches every micro-batch
    by_chunk = [(c, i) for c in range(v) for i in range(m)]  # all of chunk 0, then chunk 1
    if got == by_mb:
        return (f"{label}: rank {r} switches chunk after every micro-batch (0F0, 1F0, 0F1, ...). "
                f"Micro-batches go through the chunks in groups of p = {p}: micro-batches 0..p−1 "
                "on chunk 0, the same ones on chunk 1, ..., then the next p. A micro-batch's "
                "forward on chunk 1 of rank 0 needs its chunk-0 output to have crossed all p "
                "ranks first: p forwards of other micro-batches fill that wait.")
    if got == by_chunk and m > p:
        return (f"{label}: rank {r} runs every micro-batch on chunk 0 before any on chunk 1: "
                f"groups of m = {m}, not of p = {p}. That holds v·m micro-batches of "
                "activations before the first backward and leaves the bubble of 1F1B. Go "
                "through the chunks in groups of p micro-batches.")
    return None


def _check_sequences(label: str, s: Schedule, ref: Schedule) -> None:
    __tracebackhide__ = True
    p, m, v = s.p, s.m, s.v
    for order, want in zip(s.ranks, ref.ranks):
        if sorted(order, key=str) != sorted(want, key=str):  # missing or extra actions
            _validated(s, label)  # its message names them
    for r, (order, want) in enumerate(zip(s.ranks, ref.ranks)):
        got_f, want_f = _sequence_of(order, Kind.F), _sequence_of(want, Kind.F)
        if got_f != want_f:
            why = _groups_message(label, r, got_f, p, m, v)
            if why is None:
                k = next((i for i, (a, b) in enumerate(zip(got_f, want_f)) if a != b), 0)
                why = (f"{label}: rank {r}'s forwards are not in interleaved order: its forward "
                       f"number {k} is chunk {got_f[k][0]}, micro-batch {got_f[k][1]}. "
                       "Forwards go through the chunks in groups of p micro-batches, chunk 0 "
                       "first, micro-batches in increasing order within a group.")
            raise CheckFailed(why + "\n" + _orders(s))
        got_b, want_b = _sequence_of(order, Kind.B), _sequence_of(want, Kind.B)
        if got_b != want_b:
            if got_b == [(v - 1 - c, i) for c, i in want_b]:
                why = (f"{label}: rank {r} runs its backwards in the forwards' chunk order "
                       f"(chunk 0 first). A micro-batch's backward starts where its forward "
                       f"ended, on the last chunk (v − 1 = {v - 1}), and works back to chunk 0: "
                       "in each group of p micro-batches, visit the chunks from the last to the "
                       "first.")
            else:
                k = next((i for i, (a, b) in enumerate(zip(got_b, want_b)) if a != b), 0)
                why = (f"{label}: rank {r}'s backwards are not in interleaved order: its "
                       f"backward number {k} is chunk {got_b[k][0]}, micro-batch {got_b[k][1]}. "
                       "Backwards go in the same groups of p micro-batches as the forwards, "
                       "oldest first, chunks from the last to the first.")
            raise CheckFailed(why + "\n" + _orders(s))


def check_interleaved(fn: Callable[[int, int, int], Schedule]) -> None:
    """``fn(p, m, v)``: interleaved 1F1B with ``v`` chunks per rank (Megatron-LM's order).

    Checked per rank: the forwards in groups of ``p`` micro-batches per chunk, the backwards in
    the same groups with the chunks reversed, the warm-up count, then the validator, then the
    whole order.
    """
    __tracebackhide__ = True
    for p, m, v in _INTERLEAVED_CASES:
        args = {"p": p, "m": m, "v": v}
        label = _label(fn, args)
        s = _schedule(fn, args)
        if s.split_backward:
            raise CheckFailed(f"{label}: interleaved 1F1B has whole backwards (F and B, no W)")
        if s.v != v:
            raise CheckFailed(f"{label} returned a schedule with v={s.v} chunk(s) per rank, but "
                              f"v={v}: actions take a chunk, F(mb, chunk) (chunks 0..v−1); pass "
                              "v=v to Schedule")
        ref = interleaved(p, m, v)
        _check_sequences(label, s, ref)
        total = m * v
        for r, order in enumerate(s.ranks):
            warm = min(2 * (p - r - 1) + (v - 1) * p, total)
            plain = warm + (warm < total)  # the warm-up, then the steady phase's first forward
            got = _warmup(order)
            if got not in {plain, _warmup(ref.ranks[r])}:
                diff = _how_far(got, plain)
                raise CheckFailed(
                    f"{label}: rank {r} runs {got} forward(s) before its first backward (its "
                    f"warm-up, plus the first forward of the steady phase if it has one): {diff}. "
                    f"Its first backward is micro-batch 0 on its last chunk; before that "
                    f"gradient can come back, micro-batch 0 must go through the p·v = {p * v} "
                    "stages and back. Count the forwards rank r can run meanwhile: every chunk "
                    "before the last one is a full group of p, and on the last chunk it is "
                    "1F1B's warm-up counted twice (one slot for the forward, one for the "
                    "backward of each later rank), never more than v·m in all.\n" + _orders(s))
        _validated(s, label)
        for r, order in enumerate(s.ranks):
            fwd = [a for a in ref.ranks[r] if a.kind is Kind.F]
            bwd = [a for a in ref.ranks[r] if a.kind is Kind.B]
            lead = _warmup(order)
            if tuple(order) != _compose(fwd, bwd, lead if lead == len(fwd) else lead - 1):
                raise CheckFailed(
                    f"{label}: rank {r}'s warm-up is right, but after it the rank does not "
                    "alternate one forward (the next in line) and one backward (the oldest "
                    "waiting), then run the remaining backwards.\n" + _orders(s))
    _passed(f"interleaved validates and matches Megatron-LM's order on "
            f"{len(_INTERLEAVED_CASES)} cases (v = 2, 3, 4; m = p included)")
