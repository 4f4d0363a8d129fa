"""``python -m minipipe plan``: rank the ways to train a model on a cluster.

    python -m minipipe plan --model llama3-70b --hardware h100-80gb --gpus 512 --batch 1024
    python -m minipipe plan --layers 32 --hidden 4096 --heads 32 --seq 4096 --vocab 32000 \\
        --gpus 64 --batch 512 --plot plan.png
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

from .costmodel import HARDWARE, MODELS, RECOMPUTE, Model
from .plan import SCHEDULES, plan


def build_parser(parser_class: type = argparse.ArgumentParser) -> argparse.ArgumentParser:
    ap = parser_class(prog="minipipe plan", description="Enumerate p, v, dp, t, micro-batch "
                      "size and count, schedule and recomputation; rank what fits.")
    ap.add_argument("--model", choices=sorted(MODELS), help="a preset (or give the sizes below)")
    for name in ("layers", "hidden", "heads", "seq", "vocab", "ffn", "kv-heads"):
        ap.add_argument(f"--{name}", type=int)
    ap.add_argument("--gated", action="store_true", help="SwiGLU MLP (Llama)")
    ap.add_argument("--flash", action="store_true", help="attention scores not stored")
    ap.add_argument("--hardware", choices=sorted(HARDWARE), default="h100-80gb")
    ap.add_argument("--efficiency", type=float, help="fraction of peak FLOP/s reached")
    ap.add_argument("--gpus", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True, help="global batch in sequences")
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=list(RECOMPUTE))
    ap.add_argument("--no-zero", action="store_true", help="do not shard the optimizer over dp")
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--plot", metavar="FILE.png")
    return ap


def _model(args: argparse.Namespace) -> Model:
    sizes = {k: getattr(args, k.replace("-", "_")) for k in
             ("layers", "hidden", "heads", "seq", "vocab", "ffn", "kv-heads")}
    given = {k.replace("-", "_"): v for k, v in sizes.items() if v is not None}
    if args.model:
        base = MODELS[args.model]
        given = {("kv_heads" if k == "kv_heads" else k): v for k, v in given.items()}
        return replace(base, **given, **({"gated": True} if args.gated else {}),
                       **({"flash": True} if args.flash else {}))
    missing = [k for k in ("layers", "hidden", "heads", "seq", "vocab") if k not in given]
    if missing:
        raise ValueError(f"give --model or all of --{', --'.join(missing)}")
    return Model("custom", **given, gated=args.gated, flash=args.flash)


def main(argv: list[str], parser_class: type = argparse.ArgumentParser) -> int:
    args = build_parser(parser_class).parse_args(argv)
    try:
        model = _model(args)
        hw = HARDWARE[args.hardware]
        if args.efficiency is not None:
            hw = replace(hw, efficiency=args.efficiency)
        result = plan(model, hw, args.batch, args.gpus, schedules=tuple(args.schedules),
                      recompute=tuple(args.recompute), zero=not args.no_zero)
    except ValueError as err:
        print(f"minipipe: error: {err}", file=sys.stderr)
        return 2
    print(result.table(args.top))
    if not result.feasible:
        print("nothing fits; the closest:", file=sys.stderr)
        for e in result.rejected[:3]:
            print(f"  {e.config}: {e.reason}", file=sys.stderr)
        return 1
    if result.rejected:
        e = result.rejected[0]
        print(f"closest that does not fit: {e.config}: {e.reason}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        ax = result.plot(top=args.top)
        ax.figure.savefig(args.plot, dpi=120)
    return 0
