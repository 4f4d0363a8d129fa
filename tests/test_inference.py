"""Pipelined greedy generation: the same tokens as one process, the schedule as data.

The exact test: :func:`generate` on real gloo ranks gives, token for token, what
:func:`generate_reference` (the whole model in one process, every step recomputed without a
cache) gives, for groups of different prompt lengths and batch sizes, with fewer, as many
and more groups than stages. The GPT is re-initialised with large weights so that greedy
decoding does not repeat one token (a test a constant output would pass is no test).
Timings are not asserted here (notebook 14 measures them). Multi-process runs are ``slow``.
"""

from __future__ import annotations

import pytest
import torch

from minipipe.models import Block, gpt, stand_in_gpt
from minipipe.runtime import ConfigError
from minipipe.runtime.inference import (
    _run_layers,
    generate,
    generate_reference,
    inference_schedule,
    simulate_inference,
)


def lively_gpt(layers: int = 6) -> torch.nn.Sequential:
    model = gpt(vocab=32, context=16, width=16, layers=layers, heads=2, seed=3)
    torch.manual_seed(1)
    for q in model.parameters():
        if q.dim() == 2:
            torch.nn.init.normal_(q, std=0.5)
    return model


def prompt_groups(sizes: list[tuple[int, int]], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 32, size, generator=g) for size in sizes]


GROUPS = [(2, 4), (1, 6), (3, 5)]  # (requests, prompt length) per group


def test_reference_is_not_trivial():
    tokens = generate_reference(lively_gpt(), prompt_groups(GROUPS), 8)
    assert all(len(t.unique()) > 2 for t in tokens)


def test_kv_cache_gives_the_logits_of_the_full_sequence():
    model = lively_gpt().eval()
    ids = prompt_groups([(2, 9)])[0]
    full = model(ids)
    caches = [{} for _ in model]
    with torch.no_grad():
        first = _run_layers(list(model), ids[:, :5], caches, 0)  # prefill five tokens
        steps = [_run_layers(list(model), ids[:, i:i + 1], caches, i) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat([first, *steps], dim=1), full, atol=1e-5, rtol=1e-4)
    assert caches[1]["k"].shape == (2, 2, 9, 8)  # (B, heads, positions, C / heads)
    assert isinstance(model[1], Block)


def test_schedule_and_simulated_timeline():
    sched = inference_schedule(2, 3, 2)
    assert str(sched.ranks[0][:4]) == "(F0, F1, F2, F0)" and sched.ranks[0] == sched.ranks[1]
    one = simulate_inference(4, 1, 5)  # one group: one stage busy at a time
    assert one.step_time == 4 * 5 and one.bubble_fraction == pytest.approx(3 / 4)
    full = simulate_inference(4, 4, 5)  # p groups: the pipeline fills once, then stays full
    assert full.step_time == 5 * 4 + 3
    assert full.bubble_fraction == pytest.approx(3 / (5 * 4 + 3))
    # latency: a token still takes p stage passes, whatever the number of groups (≥ p)
    assert simulate_inference(4, 6, 5).step_time == 5 * 6 + 3


def test_bad_configurations_fail_before_any_process():
    model = lively_gpt()
    with pytest.raises(ConfigError, match="context"):
        generate(model, prompt_groups([(1, 10)]), 8, p=2)
    with pytest.raises(ConfigError, match="Embed"):
        generate(model[1:], prompt_groups([(1, 4)]), 2, p=2)
    with pytest.raises(ConfigError, match="non-empty"):
        generate(model, prompt_groups([(1, 4)]), 2, p=2, bounds=[0, 8, 8])


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
@pytest.mark.parametrize("p,groups", [(2, 3), (4, 2)], ids=["p2-3groups", "p4-2groups"])
def test_pipelined_tokens_equal_one_process(p, groups):
    model, prompts = lively_gpt(), prompt_groups(GROUPS[:groups])
    want = generate_reference(model, prompts, 8)
    got = generate(model, prompts, 8, p=p, timeout=120)
    for g, (a, b) in enumerate(zip(got.tokens, want)):
        assert torch.equal(a, b), f"group {g}: pipeline {a.tolist()} vs one process {b.tolist()}"
    tl = got.timeline
    assert len(tl.events) == p * groups * 8  # every stage pass of every group, once
    assert all(len(t) == 8 for t in got.token_times) and got.tokens_per_s > 0
    # each rank holds the keys and values of its own blocks for every group: 2·B·(T+n−1)·C floats
    blocks = [sum(isinstance(layer, Block) for layer in model[lo:hi])
              for lo, hi in zip(got.info["bounds"], got.info["bounds"][1:])]
    per_block = sum(2 * b * (t + 8 - 1) * 16 * 4 for b, t in GROUPS[:groups])
    assert got.info["kv_bytes"] == [n * per_block for n in blocks]


@pytest.mark.slow
@pytest.mark.usefixtures("no_leftover_ranks")
def test_one_rank_and_stand_in_blocks_run():
    model = stand_in_gpt(2, t_f=0.001)
    got = generate(model, prompt_groups([(1, 3), (1, 3)]), 3, p=1)
    assert torch.equal(torch.cat(got.tokens), torch.cat(generate_reference(model, prompt_groups(
        [(1, 3), (1, 3)]), 3)))
