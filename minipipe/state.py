"""Pipeline checkpoints: each rank saves its stage by parameter name; merge, load or resume them.

``train(..., save_dir=d)`` makes every rank write ``d/rank{global_rank}.pt`` at the end of the
run: its parameters and optimizer state keyed by parameter *name* (``"3.up.weight"``, the
names :class:`~minipipe.runtime.result.RunResult` uses), its buffers, and metadata (schedule, stage
bounds, step count, which names it holds). Names, not positions, are what make a checkpoint
independent of the split: :func:`merge_checkpoint` joins the files into one state for the
single-process model, :func:`load_into` loads it there, and ``train(..., resume_from=d)``
starts a run with *any* ``p``, ``v`` or bounds from it.

A save is all-or-nothing. The ranks write into a new directory beside the files of the
previous save (``d/.saving-<run id>/``); only when every rank's file is there does the caller
mark it complete (one atomic rename) and move the files into place (:func:`commit_save`). A
reader takes a complete ``.saving-*`` directory when one is left (a commit interrupted halfway)
and ignores incomplete ones, which the next save removes: killed at any point, a save leaves
either the previous checkpoint or the new one, never a mix. Each save also carries a run id:
files from two different saves are never mixed silently.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .schedules import Schedule

__all__ = ["CheckpointError", "param_names", "merge_checkpoint", "load_into", "atomic_save", "rank_file",
           "begin_save", "commit_save", "FORMAT"]

FORMAT = 1  #: version of the file layout
_STAGING = ".saving-"  # a save in progress: d/.saving-<run id>/rank{r}.pt
_COMPLETE = "COMPLETE"  # in a staging directory: every rank's file is there


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, incomplete, or for another model."""


def rank_file(directory: str | os.PathLike, rank: int) -> str:
    """``directory/rank{rank}.pt``: where global rank ``rank`` saves."""
    return os.path.join(os.fspath(directory), f"rank{rank}.pt")


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file next to ``path``, then rename it over ``path``.

    If anything fails before the rename, the temporary file is removed and ``path`` still
    holds what it held before.
    """
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ------------------------------------------------------------------------- writing (ranks)


def param_names(layers: Sequence[nn.Module]) -> dict[int, str]:
    """``id(parameter) -> "layer.name"``; a tied parameter gets the name of its first use."""
    names: dict[int, str] = {}
    for i, layer in enumerate(layers):
        for name, p in layer.named_parameters():
            names.setdefault(id(p), f"{i}.{name}")
    return names


def layout(model: nn.Sequential) -> dict[str, Any]:
    """Names and shapes of the whole model: parameters, their aliases (tied), and buffers."""
    layers = list(model)
    names = param_names(layers)
    shapes, aliases = {}, {}
    for i, layer in enumerate(layers):
        for key, prm in layer.named_parameters(remove_duplicate=False):
            aliases[f"{i}.{key}"] = names[id(prm)]  # a tied weight: two keys, one name
            shapes[names[id(prm)]] = list(prm.shape)
    buffers = [k for k in model.state_dict() if k not in aliases]
    return {"names": shapes, "aliases": aliases, "buffers": buffers, "num_layers": len(layers)}


def optimizer_name(optimizer: str | Callable, params: Iterable[nn.Parameter]) -> str:
    """Class name of the optimizer ``train`` builds from its ``optimizer`` argument."""
    if callable(optimizer):
        return type(optimizer(list(params))).__name__
    return {"sgd": "SGD", "adam": "Adam"}.get(optimizer, str(optimizer))


def save_meta(model: nn.Sequential, schedule: Schedule, bounds: list[int], dp: int, step: int,
              optimizer: str | Callable) -> dict[str, Any]:
    """What every rank's file records about the run (built once, by the caller)."""
    sched = {"name": schedule.name, "p": schedule.p, "m": schedule.m, "v": schedule.v,
             "placement": [list(rc) for rc in schedule.placement],  # DualPipe: pipelines 2
             **({"pipelines": schedule.pipelines} if schedule.pipelines > 1 else {})}
    return {"format": FORMAT, "run": uuid.uuid4().hex, "step": step, "dp": dp, "schedule": sched,
            "bounds": list(bounds), "world_size": dp * schedule.p,
            "optimizer": optimizer_name(optimizer, model.parameters()), **layout(model)}


def _cpu(value: Any) -> Any:
    return value.detach().cpu().clone() if isinstance(value, torch.Tensor) else value


def save_rank(worker: Any, directory: str, meta: dict[str, Any]) -> str:
    """Write this rank's parameters, buffers and optimizer state by name; returns the path.

    ``worker`` is the rank's :class:`~minipipe.runtime.stage.StageWorker`. Only pipeline 0's
    stages are saved (DualPipe's pipeline 1 holds replicas: the same layers and weights).
    """
    stages = [worker.sched.stage(worker.rank, c) for c in worker.chunks]
    kept = [c for c, s in zip(worker.chunks, stages) if worker.sched.group_of_stage(s) == 0]
    ids = {id(q) for c in kept for q in worker.chunks[c].parameters()}
    saved = {n: q for n, q in worker.params.items() if id(q) in ids}
    params = {n: _cpu(q) for n, q in saved.items()}
    optim = {n: {k: _cpu(v) for k, v in worker.opt.state[q].items()}
             for n, q in saved.items() if worker.opt and worker.opt.state.get(q)}
    buffers = {}
    for c in kept:
        first = worker.job.bounds[worker.sched.model_stage(stages[c])]
        for j, layer in enumerate(worker.chunks[c]):
            for key, t in layer.state_dict().items():
                if f"{first + j}.{key}" not in meta["aliases"]:
                    buffers[f"{first + j}.{key}"] = _cpu(t)
    mine = {**meta, "rank": worker.ctx.rank, "stages": stages, "holds": sorted(params)}
    path = rank_file(directory, worker.ctx.rank)
    atomic_save({"meta": mine, "params": params, "buffers": buffers, "optimizer": optim}, path)
    return path


def begin_save(directory: str | os.PathLike, run: str) -> str:
    """Caller side, before the ranks start: finish or remove what earlier saves left, and
    make the directory this save's ranks write into. Returns its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    for name in sorted(os.listdir(directory)):
        staging = os.path.join(directory, name)
        if name.startswith(_STAGING) and os.path.isdir(staging):
            if os.path.exists(os.path.join(staging, _COMPLETE)):
                _move_into_place(directory, staging)  # a commit interrupted halfway
            else:
                shutil.rmtree(staging, ignore_errors=True)  # a save that never completed
        elif name.startswith("rank") and name.endswith(".tmp"):  # a rank file half written
            with contextlib.suppress(OSError):
                os.unlink(staging)
    staging = os.path.join(directory, _STAGING + run)
    os.makedirs(staging)
    return staging


def commit_save(directory: str | os.PathLike, staging: str, world_size: int) -> None:
    """Caller side, after every rank returned: make the save in ``staging`` the checkpoint.

    Marking it complete is one atomic rename; from then on readers take it, and moving the
    files into ``directory`` (and deleting rank files of an earlier, larger run) can be
    interrupted and finished later by :func:`begin_save`.
    """
    missing = [r for r in range(world_size) if not os.path.exists(rank_file(staging, r))]
    if missing:
        raise CheckpointError(f"the save in {staging!r} lacks the files of ranks {missing}: "
                              "the previous checkpoint is kept")
    marker = os.path.join(staging, _COMPLETE)
    with open(marker + ".tmp", "w") as f:
        json.dump({"world_size": world_size}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".tmp", marker)
    _move_into_place(os.fspath(directory), staging)


def _move_into_place(directory: str, staging: str) -> None:
    """The last part of a commit; safe to run again after an interruption at any point."""
    with open(os.path.join(staging, _COMPLETE)) as f:
        world_size = json.load(f)["world_size"]
    for r in range(world_size):
        src, dst = rank_file(staging, r), rank_file(directory, r)
        if os.path.exists(src):
            tmp = dst + ".commit.tmp"
            shutil.copyfile(src, tmp)  # copied, not moved: the staging copy stays whole
            os.replace(tmp, dst)
    for name in os.listdir(directory):  # rank files beyond this save's ranks: an older run's
        number = name[4:-3]
        if name.startswith("rank") and name.endswith(".pt") and number.isdigit() \
                and int(number) >= world_size:
            os.unlink(os.path.join(directory, name))
    os.unlink(os.path.join(staging, _COMPLETE))  # from here on the files in place are read
    shutil.rmtree(staging, ignore_errors=True)


def checkpoint_dir(directory: str | os.PathLike) -> str:
    """Where the checkpoint in ``directory`` is: a complete save not yet moved into place,
    or ``directory`` itself."""
    directory = os.fspath(directory)
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(directory)):
            staging = os.path.join(directory, name)
            if name.startswith(_STAGING) and os.path.exists(os.path.join(staging, _COMPLETE)):
                return staging
    return directory


# --------------------------------------------------------------------------------- reading


def _read(path: str, mmap: bool = False) -> dict[str, Any]:
    if not os.path.exists(path):
        raise CheckpointError(f"{path} is missing")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # any failure to read means the same thing here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} cannot be read: the file is truncated or corrupt "
                              f"({reason})") from e
    if not isinstance(data, dict) or not {"meta", "params", "optimizer"} <= data.keys():
        raise CheckpointError(f"{path} is not a minipipe checkpoint (no meta/params/optimizer)")
    if data["meta"].get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {data['meta'].get('format')}, this version "
                              f"of minipipe reads format {FORMAT}")
    return data


def merge_checkpoint(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Join the rank files of the checkpoint in directory ``path`` into one state.

    ``mmap=True`` maps the files instead of reading them: only tensors used are paged in
    (how a rank of a run given layer specs reads just its own layers).

    Returns:
        ``{"model": state_dict, "optimizer": {name: state}, "meta": meta}``. ``model`` loads
        into the single-process model with ``load_state_dict(strict=True)``: every alias of a
        tied weight is filled (from the lowest rank holding it; the copies are identical
        unless the run used ``tie_sync=False``). ``meta``: the run's metadata (schedule,
        bounds, step, optimizer, names and shapes), and under ``"ranks"`` each rank's stages
        and the names it holds.

    Raises:
        CheckpointError: no checkpoint there, a rank file missing, unreadable or from another
            save, or a parameter that no rank holds or whose shape is wrong.
    """
    directory = os.fspath(path)
    if os.path.isfile(directory):  # a rank file was given: use its directory
        directory = os.path.dirname(directory) or "."
    directory = checkpoint_dir(directory)
    if not os.path.exists(rank_file(directory, 0)):
        raise CheckpointError(f"no checkpoint in {directory!r}: {rank_file(directory, 0)} "
                              "not found")
    first = _read(rank_file(directory, 0), mmap)
    meta = first["meta"]
    for r in range(1, meta["world_size"]):
        if not os.path.exists(rank_file(directory, r)):
            raise CheckpointError(f"{rank_file(directory, r)} is missing: the checkpoint was "
                                  f"written by {meta['world_size']} ranks")
    files = [first] + [_read(rank_file(directory, r), mmap) for r in range(1, meta["world_size"])]
    params: dict[str, torch.Tensor] = {}
    buffers: dict[str, torch.Tensor] = {}
    optim: dict[str, dict] = {}
    for r, f in enumerate(files):
        if f["meta"]["run"] != meta["run"]:
            raise CheckpointError(
                f"{rank_file(directory, r)} comes from another save than rank0.pt (step "
                f"{f['meta']['step']} vs {meta['step']}): a save was interrupted or the "
                "directory mixes two runs; save again")
        for n, t in f["params"].items():
            params.setdefault(n, t)
        for k, t in f.get("buffers", {}).items():
            buffers.setdefault(k, t)
        for n, s in f["optimizer"].items():
            optim.setdefault(n, s)
    missing = [n for n in meta["names"] if n not in params]
    if missing:
        raise CheckpointError(f"checkpoint {directory!r} is incomplete: no rank holds {missing}")
    for n, shape in meta["names"].items():
        if list(params[n].shape) != shape:
            raise CheckpointError(f"checkpoint {directory!r}: {n!r} has shape "
                                  f"{list(params[n].shape)}, its metadata says {shape}")
    model = {key: params[name] for key, name in meta["aliases"].items()}
    model.update({k: buffers[k] for k in meta["buffers"] if k in buffers})
    own = ("rank", "stages", "holds")  # per-rank entries, gathered under "ranks"
    merged_meta = {k: v for k, v in meta.items() if k not in own}
    merged_meta["ranks"] = [{k: f["meta"][k] for k in own} for f in files]
    return {"model": model, "optimizer": optim, "meta": merged_meta}


def _shape(t: Any) -> list[int] | None:
    return list(t.shape) if isinstance(t, torch.Tensor) else None


def check_model(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Raise :class:`CheckpointError` naming every key missing, extra or of another shape."""
    want = model.state_dict()
    have = state["model"]
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    shapes = [f"{k!r} is {_shape(have[k])} in the checkpoint, {_shape(want[k])} in the model"
              for k in want if k in have and _shape(have[k]) != _shape(want[k])]
    if missing or extra or shapes:
        problems = ([f"missing {missing}"] if missing else []) + \
                   ([f"not in the model {extra}"] if extra else []) + shapes
        written = state.get("meta", {})
        raise CheckpointError(
            f"the checkpoint does not fit this model (it was written for a model of "
            f"{written.get('num_layers', '?')} layers, this one has "
            f"{len(list(model.children()))}): "
            + "; ".join(problems))


def check_optimizer(state: Mapping[str, Any], name: str) -> None:
    """Optimizer state is only meaningful to the optimizer class that wrote it."""
    saved = state.get("meta", {}).get("optimizer")
    if state["optimizer"] and saved != name:
        raise CheckpointError(f"the checkpoint holds {saved} optimizer state, but this run uses "
                              f"{name}: resume with the same optimizer")


def restore_optimizer(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter],
                      saved: Mapping[str, Mapping[str, Any]]) -> None:
    """Put each parameter's saved state (momentum, Adam moments and step) into ``optimizer``.

    Tensors go to the parameter's device (and dtype, if floating point). Adam's ``step`` stays
    a CPU scalar unless the optimizer is ``capturable`` or ``fused``, the rule
    ``Optimizer.load_state_dict`` follows.
    """
    group_of = {id(q): g for g in optimizer.param_groups for q in g["params"]}
    for name, prm in params.items():
        if name not in saved:
            continue
        group = group_of.get(id(prm), {})
        on_device = bool(group.get("capturable") or group.get("fused"))
        state = {}
        for k, v in saved[name].items():
            if not isinstance(v, torch.Tensor):
                state[k] = v
            elif k == "step":
                state[k] = v.to(prm.device, torch.float32) if on_device else v.clone()
            else:
                state[k] = v.to(prm.device, prm.dtype if v.is_floating_point() else v.dtype,
                                copy=True)
        optimizer.state[prm] = state


def load_into(model: nn.Sequential, path_or_state: str | os.PathLike | Mapping[str, Any],
              optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load a pipeline checkpoint into the single-process ``model`` (and ``optimizer``).

    Args:
        model: the whole model, as ``nn.Sequential`` (the layout ``train`` splits).
        path_or_state: a checkpoint directory, or what :func:`merge_checkpoint` returned.
        optimizer: optional, built over ``model.parameters()``; gets the saved state by name.

    Returns:
        The merged state (see :func:`merge_checkpoint`).

    Raises:
        CheckpointError: the checkpoint is unreadable or does not fit the model or optimizer.
    """
    state = (dict(path_or_state) if isinstance(path_or_state, Mapping)
             else merge_checkpoint(path_or_state))
    check_model(model, state)
    model.load_state_dict(state["model"], strict=True)
    if optimizer is not None:
        check_optimizer(state, type(optimizer).__name__)
        names = param_names(list(model))
        restore_optimizer(optimizer, {names[id(q)]: q for q in model.parameters()},
                          state["optimizer"])
    return state


def load_stage(layers: Mapping[int, nn.Module], path: str | os.PathLike) -> dict[str, dict]:
    """A rank's side of ``resume_from`` with layer specs: load layers ``{index: layer}`` from
    the checkpoint (mapped, not read whole); returns the optimizer state by parameter name."""
    state = merge_checkpoint(path, mmap=True)
    for i, layer in layers.items():
        mine = {k: state["model"][f"{i}.{k}"] for k in layer.state_dict()}
        layer.load_state_dict(mine, strict=True)
    return state["optimizer"]


def check_resume(meta_model: nn.Sequential, path: str | os.PathLike,
                 optimizer: str | Callable) -> int:
    """Caller side of ``resume_from`` with layer specs: check the checkpoint's names and shapes
    against the model on the meta device (files mapped, not read); returns its step count."""
    state = merge_checkpoint(path, mmap=True)
    check_model(meta_model, state)
    check_optimizer(state, optimizer_name(optimizer, meta_model.parameters()))
    return int(state["meta"]["step"])


def prepare_resume(model: nn.Sequential, path: str | os.PathLike,
                   optimizer: str | Callable) -> tuple[nn.Sequential, dict[str, dict], int]:
    """Caller side of ``resume_from``: check everything, before any process starts.

    Returns a copy of ``model`` holding the checkpoint's weights, the optimizer state by name
    (each rank takes the names it holds), and the step count the checkpoint was written at.
    """
    import copy

    state = merge_checkpoint(path)
    model = copy.deepcopy(model)
    load_into(model, state)
    check_optimizer(state, optimizer_name(optimizer, model.parameters()))
    return model, state["optimizer"], int(state["meta"]["step"])
