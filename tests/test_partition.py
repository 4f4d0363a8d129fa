"""Partitioning: the balanced split is optimal, each method gives its documented split, errors."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from minipipe.models import gpt, mlp, stand_in
from minipipe.partition import (Partition, balanced, by_layers, by_parameters, by_time, by_type,
                                profile_layers)
from minipipe.partition import split_evenly


def brute_force(costs: list[float], n: int) -> tuple[float, list[int]]:
    """Smallest bottleneck over all C(L-1, n-1) splits, and the lexicographically first split."""
    L = len(costs)
    splits = [[0, *cut, L] for cut in itertools.combinations(range(1, L), n - 1)]
    worst = [max(math.fsum(costs[a:b]) for a, b in zip(s, s[1:])) for s in splits]
    best = min(worst)
    return best, splits[worst.index(best)]


def random_cases(count: int, seed: int = 0):
    rng = random.Random(seed)
    for k in range(count):
        L = rng.randint(1, 9)
        n = rng.randint(1, L)
        if k % 2:  # small integers: many ties, so the tie rule is exercised
            costs = [float(rng.randint(0, 4)) for _ in range(L)]
        else:
            costs = [rng.uniform(0, 10) for _ in range(L)]
        yield costs, n


@pytest.mark.parametrize("seed", range(4))
def test_balanced_split_is_optimal_and_lexicographically_first(seed):
    for costs, n in random_cases(150, seed):
        part = balanced(costs, n)
        best, first = brute_force(costs, n)
        assert max(part.stage_costs) == best, (costs, n, part.bounds)
        assert part.bounds == first, f"tie rule: {costs} in {n} stages"
        assert len(part.bounds) == n + 1
        assert all(a < b for a, b in zip(part.bounds, part.bounds[1:]))


def test_balanced_on_a_known_case():
    part = balanced([1, 1, 1, 1, 4, 1, 1], 3)
    assert part.bounds == [0, 4, 5, 7]  # the 4 alone: bottleneck 4, stage 0 ends as early as it can
    assert part.stage_costs == [4, 4, 2]
    assert part.bottleneck == 0
    assert part.imbalance == pytest.approx(4 / (10 / 3))


def test_by_layers_matches_split_evenly():
    assert by_layers(mlp(layers=6), 4).bounds == [0, 2, 4, 6, 8]
    for L, n in [(8, 3), (5, 5), (7, 2), (1, 1)]:
        assert by_layers([torch.nn.Identity()] * L, n).bounds == split_evenly(L, n)


def test_by_parameters_with_small_first_and_last_layers():
    # mlp(layers=6): Linear(16, 32) = 544, six residual layers of 8416, Linear(32, 16) = 528
    model = mlp(layers=6)
    part = by_parameters(model, 3)
    assert part.costs == [544, *[8416] * 6, 528]
    assert part.bounds == [0, 3, 5, 8]  # two residual layers per stage
    assert by_layers(model, 3).bounds == [0, 3, 6, 8]  # three in the middle stage
    assert max(part.stage_costs) < max(by_parameters(model, 1).stage_costs)


def test_by_parameters_with_large_first_and_last_layers():
    # Linear(512, 16) = 8208, four residual layers of 2160, Linear(16, 512) = 8704
    model = mlp(layers=4, width=16, d_in=512, d_out=512)
    part = by_parameters(model, 3)
    assert part.bounds == [0, 1, 5, 6]  # the big projections alone, the residual layers together
    assert part.stage_costs == [8208, 4 * 2160, 8704]
    assert part.bottleneck == 2
    assert by_layers(model, 3).bounds == [0, 2, 4, 6]


def test_by_type_counts_only_matching_layers():
    model = gpt(layers=4)  # [Embed, Block x 4, Head]
    assert by_type(model, 2, "Block").bounds == [0, 3, 6]
    assert by_type(model, 4, "Block").bounds == [0, 2, 3, 4, 6]  # Embed joins the first Block
    assert by_type(model, 4, "^Bl").method == "type:^Bl"
    with pytest.raises(ValueError, match="no layer's class name matches 'Conv'"):
        by_type(model, 2, "Conv")
    with pytest.raises(ValueError, match="matches 4 layers, too few for 5 stages"):
        by_type(model, 5, "Block")


def test_profile_and_by_time_find_the_slow_layer():
    # Stand-in layers sleep: layer 0 takes 120 ms (forward + backward), the others 12 ms each.
    # The margins are wide because sleeps overshoot on a loaded machine.
    model = stand_in(4, width=8, t_f=0.004, t_b=0.008, slow={0: 10})
    x = torch.randn(4, 8)
    times = profile_layers(model, x, repeats=3)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert times[0] > 0.12 and times[0] > sum(times[1:])
    assert all(p.grad is None for p in model.parameters())  # left as it was
    part = by_time(model, 2, x)
    assert part.bounds == [0, 1, 4] and part.method == "time" and part.bottleneck == 0


def test_profile_layers_accepts_integer_input():
    times = profile_layers(gpt(layers=2), torch.randint(0, 32, (2, 8)), repeats=1)
    assert len(times) == 4


def test_partition_table_and_use_as_bounds():
    part = by_parameters(mlp(layers=6), 3)
    text = str(part)
    assert "partition by parameters: 3 stages over 8 layers" in text
    assert "bottleneck" in text and "imbalance" in text
    assert isinstance(part.bounds, list)


def test_errors():
    with pytest.raises(ValueError, match="must be >= 1"):
        balanced([1, 2], 0)
    with pytest.raises(ValueError, match="3 stages need at least 3 layers, but there are 2"):
        balanced([1, 2], 3)
    with pytest.raises(ValueError, match="5 stages need at least 5 layers"):
        by_layers(mlp(layers=2), 5)
    with pytest.raises(ValueError, match="non-negative; layer 1 has -1.0"):
        balanced([1, -1, 2], 2)
    with pytest.raises(ValueError, match="finite"):
        balanced([1, float("nan")], 1)
    with pytest.raises(ValueError, match="leave stage 1 empty"):
        Partition([0, 2, 2, 3], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="from 0 to 3"):
        Partition([0, 2], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="repeats"):
        profile_layers(mlp(layers=1), torch.randn(2, 16), repeats=0)
