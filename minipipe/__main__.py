"""Command line: run a schedule on real ranks and report what it measured.

    python -m minipipe run --model mlp --schedule 1f1b --stages 2 --microbatches 4 --check
    python -m minipipe run --schedule interleaved --stages 2 --microbatches 4 --chunks 2 \\
        --json run.json --plot run.png --trace run.trace.json
    torchrun --nproc-per-node 2 -m minipipe run --schedule 1f1b --stages 2 --microbatches 4
    python -m minipipe grade ...            # the exercise grader (minipipe.course.grade)
    python -m minipipe plan --model llama3-70b --gpus 512 --batch 1024   # minipipe.planner

Exit status: 0 done, 1 the run failed or ``--check`` found a gradient off by more than
1e-4, 2 bad arguments (one line on stderr). Under ``torchrun`` every process is one rank and
only rank 0 prints and writes files.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import tempfile
from typing import Any

TOLERANCE = 1e-4  # largest |gradient difference| --check accepts (float32 reassociation: ~1e-7)
SCHEDULE_NAMES = ["naive", "gpipe", "1f1b", "interleaved", "zb-h1"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage block
        self.exit(2, f"minipipe: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minipipe", description="Pipeline-parallel training you can measure.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="train a small model with a schedule on real ranks",
                         description="Train a small model with a pipeline schedule on real ranks "
                                     "and compare what was measured with the prediction.")
    run.add_argument("--model", choices=["mlp", "gpt"], default="mlp")
    run.add_argument("--schedule", choices=SCHEDULE_NAMES, default="1f1b")
    run.add_argument("--stages", "-p", type=int, default=2, help="p: pipeline ranks")
    run.add_argument("--microbatches", "-m", type=int, default=4, help="m: micro-batches per step")
    run.add_argument("--chunks", "-v", type=int, help="v: chunks per rank (interleaved; default 2)")
    run.add_argument("--batch", type=int, help="B: samples per step (default 4·m)")
    run.add_argument("--layers", type=int, help="MLP or GPT blocks (default max(4, p·v))")
    run.add_argument("--width", type=int, default=32)
    run.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--backend", choices=["auto", "gloo", "nccl"], default="auto")
    run.add_argument("--tie", action="store_true", help="GPT: tie the embedding and the LM head")
    run.add_argument("--check", action="store_true",
                     help=f"compare with single-process training (exit 1 above {TOLERANCE:g})")
    run.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    run.add_argument("--plot", metavar="FILE.png", help="save predicted vs measured timelines")
    run.add_argument("--trace", metavar="FILE.json", help="write a Chrome/Perfetto trace")
    sub.add_parser("grade", help="check the exercises (minipipe.course.grade; arguments pass through)")
    sub.add_parser("plan", help="rank p, v, dp, t, m, schedule, recomputation for a model on a "
                                "cluster (minipipe.planner; see plan --help)")
    return parser


def _check_writable(flag: str, path: str | None) -> None:
    from .errors import ConfigError

    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ConfigError(f"{flag} {path} is a directory: give a file name")
    if not os.path.isdir(folder):
        raise ConfigError(f"{flag} {path}: the folder {folder} does not exist")
    try:  # the one sure test (permissions, read-only mounts, /proc): open it for writing
        if os.path.exists(path):
            open(path, "a").close()
        else:  # a file of our own beside it: under torchrun every process checks at once
            tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(f"{flag} {path} cannot be written ({err.strerror}): give a path you "
                          "can write to") from None


def _mlp_step(batch: int, seed: int, k: int) -> tuple[Any, Any]:
    from .models import mlp_batch

    return mlp_batch(batch, seed=seed + k)


def _token_step(batch: int, seed: int, k: int) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed * 100_003 + k + 1)
    tokens = torch.randint(0, 64, (batch, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]  # next-token prediction


def build(args: argparse.Namespace) -> tuple[Any, Any, Any, Any]:
    """Model specs, loss, schedule and a loader; raises ValueError on a configuration that
    cannot run."""
    import torch.nn.functional as F

    from .loaders import as_loader, per_step
    from .models import gpt_loss, gpt_specs, mlp_specs
    from .runtime import ConfigError, check_config
    from .runtime.launch import choose_backend, under_torchrun
    from .schedules import make_schedule

    for flag in ("json", "plot", "trace"):  # refused now, not after the training
        _check_writable(f"--{flag}", getattr(args, flag))
    v = args.chunks if args.chunks is not None else (2 if args.schedule == "interleaved" else 1)
    schedule = make_schedule(args.schedule, args.stages, args.microbatches, v)
    layers = args.layers if args.layers is not None else max(4, schedule.num_stages)
    for name in ("layers", "width", "steps"):
        if (layers if name == "layers" else getattr(args, name)) < 1:
            raise ConfigError(f"--{name} must be at least 1")
    if args.tie and args.model != "gpt":
        raise ConfigError("--tie needs --model gpt (the MLP has no embedding to tie)")
    batch = args.batch if args.batch is not None else 4 * args.microbatches
    # layer specs: each rank builds its own layers; data: each step's batch made on the ranks
    # that read it, so --steps 100000 starts as fast as --steps 3
    if args.model == "mlp":
        model, loss_fn = mlp_specs(layers, args.width, seed=args.seed), F.mse_loss
        data = per_step(functools.partial(_mlp_step, batch, args.seed), args.steps)
    else:
        if args.width % 2:
            raise ConfigError("--width must be even for the GPT (two attention heads)")
        model, loss_fn = gpt_specs(vocab=64, context=16, width=args.width, layers=layers,
                                   tie=args.tie, seed=args.seed), gpt_loss
        data = per_step(functools.partial(_token_step, batch, args.seed), args.steps)
    data = as_loader(data)
    check_config(model, schedule, data, 1, None)
    choose_backend(schedule.p, args.backend)
    if under_torchrun() and int(os.environ["WORLD_SIZE"]) != schedule.p:
        raise ConfigError(f"torchrun started {os.environ['WORLD_SIZE']} processes but "
                          f"--stages is {schedule.p}: use nodes × --nproc-per-node = {schedule.p}")
    return model, loss_fn, schedule, data


def figures(result: Any, schedule: Any) -> tuple[dict[str, Any], Any]:
    """The JSON report, and the timeline predicted from the measured mean action times."""
    from .simulate import simulate

    measured = result.timeline
    mean = {k: statistics.fmean(e.duration for e in measured.events if e.action.kind.value == k)
            for k in "FBW" if any(e.action.kind.value == k for e in measured.events)}
    predicted = simulate(schedule, t_f=mean["F"], t_b=mean["B"], t_w=mean.get("W"))
    report = {
        "config": {"schedule": schedule.name, "p": schedule.p, "m": schedule.m, "v": schedule.v},
        "info": result.info,
        "step_time_median": result.step_time,
        "step_times": result.step_times,
        "losses": result.losses,
        "bubble": {  # fraction: idle / (p · step time); overhead: idle / busy
            "measured": {"fraction": measured.bubble_fraction,
                         "overhead": measured.bubble_overhead, "step_time": measured.step_time},
            "predicted": {"fraction": predicted.bubble_fraction,
                          "overhead": predicted.bubble_overhead, "step_time": predicted.step_time,
                          "from_mean_times": {f"t_{k.lower()}": t for k, t in mean.items()}},
        },
        "peak_activation_bytes": {result.memory_mode: result.peak_activation_bytes,  # "observed"
                                  "predicted": result.predicted_activation_bytes},
        "messages": {"measured": result.messages, "predicted": predicted.messages},
    }
    return report, predicted


def check(result: Any, model: Any, loss_fn: Any, data: Any) -> dict[str, Any]:
    """Largest differences from single-process training on the whole batch."""
    from .runtime import reference

    ref = reference(model, loss_fn, data)

    def worst(ours: dict, theirs: dict) -> float:
        return max((float((ours[n] - t).abs().max()) for n, t in theirs.items() if t is not None),
                   default=0.0)

    grad = worst(result.grads, ref["grads"])
    return {"max_abs_grad_diff": grad, "max_abs_param_diff": worst(result.params, ref["params"]),
            "max_abs_loss_diff": max(abs(a - b) for a, b in zip(result.losses, ref["losses"])),
            "tolerance": TOLERANCE, "passed": grad <= TOLERANCE}


def run(args: argparse.Namespace) -> int:
    from .runtime import train
    from .runtime.launch import PipelineTimeout, WorkerError

    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 reports for everyone
    try:
        model, loss_fn, schedule, data = build(args)
    except ValueError as err:  # ScheduleError and ConfigError are ValueErrors too
        if rank0:
            print(f"minipipe: error: {getattr(err, 'reason', None) or str(err).splitlines()[0]}",
                  file=sys.stderr)
        return 2
    try:
        result = train(model, loss_fn, schedule, data, backend=args.backend,
                       return_grads=args.check, return_params=args.check)
    except (WorkerError, PipelineTimeout) as err:
        print(f"minipipe: the run failed: {err}", file=sys.stderr)
        return 1
    if not rank0:
        return 0
    report, predicted = figures(result, schedule)
    report["config"].update(model=args.model, batch=data.sample()[0][0].shape[0], steps=args.steps,
                            seed=args.seed, tie=args.tie)
    print(result.summary())
    print(f"predicted from the measured mean action times (no communication): step "
          f"{predicted.step_time * 1e3:.1f} ms, bubble {predicted.bubble_fraction:.1%} of the "
          f"step, {predicted.bubble_overhead:.1%} of useful work")
    status = 0
    if args.check:
        report["check"] = check(result, model, loss_fn, data)
        ok = report["check"]["passed"]
        status = 0 if ok else 1
        print(f"check against single-process training: max |grad difference| "
              f"{report['check']['max_abs_grad_diff']:.2e} "
              f"({'passed' if ok else 'FAILED'}, tolerance {TOLERANCE:g})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2, default=str)
    if args.trace:
        with open(args.trace, "w") as f:
            json.dump({"traceEvents": result.timeline.to_chrome_trace()}, f)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        from .plot import compare_timelines

        fig = compare_timelines(predicted, result.timeline)  # top: predicted, bottom: measured
        fig.savefig(args.plot, dpi=120)
    return status


def grade(argv: list[str]) -> int:
    import importlib

    try:
        grader = importlib.import_module("minipipe.course.grade")
    except ModuleNotFoundError as err:
        if err.name != "minipipe.course.grade":
            raise
        print("minipipe: error: the grader (minipipe/course/grade.py) is not in this installation",
              file=sys.stderr)
        return 2
    return int(grader.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["grade"]:  # everything after `grade` belongs to the grader
        return grade(argv[1:])
    if argv[:1] == ["plan"]:  # the planner has its own options
        from .planner.cli import main as plan_main

        return plan_main(argv[1:], _Parser)
    args = build_parser().parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
