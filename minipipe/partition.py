"""Split a sequential model into contiguous pipeline stages: by layers, parameters, type or time.

The slowest stage sets the pace of the whole pipeline, so a split is judged by its
*bottleneck*: the cost of its most expensive stage. Four ways to get one (the first three are
DeepSpeed's ``uniform``, ``parameters`` and ``type:regex``; the fourth uses measured time):

- :func:`by_layers`: the same number of layers per stage (what ``train`` does by default).
- :func:`by_parameters`: balance parameter counts.
- :func:`by_type`: balance the number of layers whose class name matches a regex ("Block").
- :func:`by_time`: balance measured forward + backward time per layer (:func:`profile_layers`).

All but the first call :func:`balanced`, the exact contiguous split that minimises the
bottleneck. Each returns a :class:`Partition`, whose ``bounds`` go straight to
``train(..., bounds=part.bounds)``: stage ``s`` holds layers ``bounds[s]:bounds[s + 1]``.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .errors import ConfigError
from .specs import SpecModel, as_specs
from .structure import as_stage_input, detach, differentiable, flatten

__all__ = ["Partition", "split_evenly", "balanced", "by_layers", "by_parameters", "by_type", "by_time",
           "profile_layers"]

Model = nn.Sequential | Sequence[nn.Module]


@dataclass(frozen=True)
class Partition:
    """A contiguous split: stage ``s`` holds layers ``bounds[s]:bounds[s + 1]``.

    Attributes:
        bounds: ``n + 1`` increasing layer indices from 0 to the number of layers.
        costs: the cost of each layer that the split was balanced on.
        method: how it was made (``"layers"``, ``"parameters"``, ``"type:Block"``, ``"time"``).
    """

    bounds: list[int]
    costs: list[float]
    method: str = "balanced"

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or b[-1] != len(self.costs):
            raise ValueError(f"bounds must run from 0 to {len(self.costs)} (the number of "
                             f"layers), got {b}")
        empty = [s for s in range(len(b) - 1) if b[s] >= b[s + 1]]
        if empty:
            raise ValueError(f"bounds {b} leave stage {empty[0]} empty: every stage needs a layer")

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def stage_costs(self) -> list[float]:
        """Total cost of each stage."""
        return [_cost(self.costs, a, b) for a, b in zip(self.bounds, self.bounds[1:])]

    @property
    def bottleneck(self) -> int:
        """Index of the slowest (most expensive) stage; the first one on a tie."""
        costs = self.stage_costs
        return costs.index(max(costs))

    @property
    def imbalance(self) -> float:
        """Slowest stage ÷ mean stage: 1.0 is perfect balance (1.5: the pipeline runs 1.5× slower
        than a perfectly balanced split of the same total would)."""
        costs = self.stage_costs
        mean = sum(costs) / len(costs)
        return max(costs) / mean if mean > 0 else 1.0

    def __str__(self) -> str:
        costs, total = self.stage_costs, sum(self.costs) or 1.0
        lines = [f"partition by {self.method}: {self.num_stages} stages over {len(self.costs)} "
                 f"layers", f"{'stage':>5}  {'layers':<9} {'cost':>10}  {'share':>6}"]
        for s, (a, b) in enumerate(zip(self.bounds, self.bounds[1:])):
            layers = f"{a}" if b - a == 1 else f"{a}-{b - 1}"
            mark = "  <- bottleneck" if s == self.bottleneck else ""
            lines.append(f"{s:>5}  {layers:<9} {costs[s]:>10.4g}  {costs[s] / total:>6.1%}{mark}")
        lines.append(f"imbalance (slowest / mean stage): {self.imbalance:.3f}")
        return "\n".join(lines)


def split_evenly(num_layers: int, num_stages: int) -> list[int]:
    """Stage boundaries for contiguous stages of (almost) equal layer count.

    Returns ``bounds`` with ``num_stages + 1`` entries: stage ``s`` holds layers
    ``bounds[s]:bounds[s + 1]``; the first stages get the extra layers.
    """
    if num_stages > num_layers:
        raise ConfigError(f"{num_stages} stages need at least {num_stages} layers (entries of the "
                          f"nn.Sequential); the model has {num_layers} (use fewer stages or "
                          f"chunks, or more layers)")
    base, extra = divmod(num_layers, num_stages)
    bounds = [0]
    for s in range(num_stages):
        bounds.append(bounds[-1] + base + (s < extra))
    return bounds


def _cost(costs: Sequence[float], a: int, b: int) -> float:
    """Cost of layers ``a:b``; ``fsum`` so every code path gets the same, correctly rounded sum."""
    return math.fsum(costs[a:b])


def _check(num_layers: int, n: int) -> None:
    if n < 1:
        raise ValueError(f"the number of stages must be >= 1, got {n}")
    if n > num_layers:
        raise ValueError(f"{n} stages need at least {n} layers, but there are {num_layers}: "
                         "every stage needs one (use fewer stages, or split the model finer)")


def balanced(costs: Sequence[float], n: int, method: str = "balanced") -> Partition:
    """The contiguous split of ``costs`` into ``n`` stages that minimises the slowest stage.

    Exact, by dynamic programming: ``best[k][j]`` is the smallest possible bottleneck of the
    first ``j`` layers in ``k`` stages, ``min over i of max(best[k-1][i], cost(i:j))``
    (``O(n·L²)`` for ``L`` layers). Several splits often reach the same bottleneck; the rule
    that picks one is: **the lexicographically smallest bounds**, i.e. each stage, from the
    first, ends as early as it can. So extra work (and zero-cost layers) lands on later stages,
    which under 1F1B keep fewer micro-batches in flight.

    Raises:
        ValueError: ``n < 1``, more stages than layers, or a negative or non-finite cost.
    """
    costs = [float(c) for c in costs]
    bad = [i for i, c in enumerate(costs) if not (math.isfinite(c) and c >= 0)]
    if bad:
        raise ValueError(f"costs must be finite and non-negative; layer {bad[0]} has "
                         f"{costs[bad[0]]}")
    L = len(costs)
    _check(L, n)
    cost = [[_cost(costs, a, b) if b > a else 0.0 for b in range(L + 1)] for a in range(L + 1)]
    # best[k][j]: smallest bottleneck for layers 0:j in k stages (inf: impossible)
    inf = math.inf
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(k, L - (n - k) + 1):
            best[k][j] = min(max(best[k - 1][i], cost[i][j]) for i in range(k - 1, j))
    target = best[n][L]
    # fits[k][a]: layers a:L fit in k stages, none above the optimal bottleneck
    fits = [[False] * (L + 1) for _ in range(n + 1)]
    fits[0][L] = True
    for k in range(1, n + 1):
        for a in range(L - k, -1, -1):
            fits[k][a] = any(cost[a][e] <= target and fits[k - 1][e] for e in range(a + 1, L + 1))
    bounds = [0]
    for k in range(n, 0, -1):  # each stage ends as early as the rest still allows
        a = bounds[-1]
        bounds.append(next(e for e in range(a + 1, L + 1)
                           if cost[a][e] <= target and fits[k - 1][e]))
    return Partition(bounds, costs, method)


def _layers(model: Model | SpecModel) -> list[nn.Module]:
    """The layers; for layer specs, on the meta device (shapes and counts, no weights)."""
    specs = as_specs(model)
    return list(specs.meta()) if specs is not None else list(model)


def by_layers(model: Model, n: int) -> Partition:
    """The same number of layers per stage; the first stages take the extra ones.

    The same bounds as :func:`split_evenly` (``train``'s default); costs are
    one per layer.
    """
    L = len(_layers(model))
    _check(L, n)
    return Partition(split_evenly(L, n), [1.0] * L, "layers")


def by_parameters(model: Model, n: int) -> Partition:
    """Balance parameter counts (:func:`balanced` on each layer's count).

    A tied weight counts in every layer that uses it: each stage holding it keeps a copy.
    """
    costs = [float(sum(p.numel() for p in layer.parameters())) for layer in _layers(model)]
    return balanced(costs, n, "parameters")


def by_type(model: Model, n: int, regex: str) -> Partition:
    """Balance the number of layers whose class name matches ``regex`` (``re.search``).

    DeepSpeed's ``type:regex``: a matching layer costs 1, any other layer 0, and the split is
    :func:`balanced`. So stage boundaries count matching layers only, and by the tie rule
    (stages end as early as they can) a non-matching layer joins the *next* matching layer's
    stage; layers after the last match join the last stage. Example: ``gpt(layers=4)``,
    ``[Embed, Block × 4, Head]`` in 2 stages by ``"Block"``: ``[Embed, Block, Block]``,
    ``[Block, Block, Head]``.

    Raises:
        ValueError: no layer matches, or fewer layers match than there are stages.
    """
    layers = _layers(model)
    match = [bool(re.search(regex, type(layer).__name__)) for layer in layers]
    found = sum(match)
    if found == 0:
        kinds = sorted({type(layer).__name__ for layer in layers})
        raise ValueError(f"no layer's class name matches {regex!r}; the model has {kinds}")
    if found < n:
        raise ValueError(f"{regex!r} matches {found} layers, too few for {n} stages: a stage "
                         "would hold none (use fewer stages or another pattern)")
    return balanced([float(m) for m in match], n, f"type:{regex}")


def profile_layers(model: Model, sample_input: torch.Tensor, repeats: int = 3) -> list[float]:
    """Seconds of forward + backward of each layer on ``sample_input`` (median of ``repeats``).

    The model runs layer by layer: each layer gets the previous layer's output (detached, so
    its own backward is timed alone), and its backward gets a gradient of ones. One untimed
    run first warms up allocators and kernels. On CUDA it synchronises around each timing;
    on CPU nothing touches ``torch.cuda``. The model's ``.grad`` fields are left as they were.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    specs = as_specs(model)
    if specs is not None:  # one real layer at a time: the caller never holds them all
        layers = (specs.build([i])[i] for i in range(len(specs)))
        return _profile(layers, sample_input, repeats)
    return _profile(_layers(model), sample_input, repeats)


def _profile(layers: Iterable[nn.Module], sample_input: torch.Tensor, repeats: int) -> list[float]:
    """Time each layer in turn; a list's ``.grad`` fields are put back afterwards."""
    saved = {p: p.grad for layer in layers for p in layer.parameters()} if isinstance(layers, list) else {}

    def sync(value: Any) -> None:
        if any(t is not None and t.is_cuda for t in flatten(value)[1]):
            torch.cuda.synchronize()

    times, x = [], sample_input
    try:
        for layer in layers:
            inp = as_stage_input(x)  # a tensor or a tuple/dict of them (see minipipe.structure)
            runs = []
            for k in range(repeats + 1):  # k = 0: warm-up
                sync(inp)
                start = time.perf_counter()
                out = layer(inp)
                grads = [t for t in differentiable(out) if t.requires_grad]
                if grads:
                    torch.autograd.backward(grads, [torch.ones_like(t) for t in grads])
                sync(out)
                if k:
                    runs.append(time.perf_counter() - start)
            times.append(statistics.median(runs))
            x = detach(out)
    finally:
        for p, g in saved.items():
            p.grad = g
    return times


def by_time(model: Model, n: int, sample_input: torch.Tensor, repeats: int = 3) -> Partition:
    """Balance measured time: :func:`balanced` on :func:`profile_layers` (seconds per layer).

    Timings are noisy on a busy machine; ``repeats`` takes the median of that many runs.
    """
    return balanced(profile_layers(model, sample_input, repeats), n, "time")
