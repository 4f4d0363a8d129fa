"""A model as layer specifications, so each rank builds only the layers of its stages.

``train`` given an ``nn.Sequential`` ships the whole model to every rank: fine for the early
lessons, the opposite of why pipelines exist. Given :class:`LayerSpec` entries instead (a
class or factory plus its arguments, DeepSpeed's ``LayerSpec``), each rank *materialises*
only the layers of its chunks; the caller sees the model only on the ``meta`` device, where
tensors have shapes and dtypes but no storage (parameter counts, partitioning by parameters,
checkpoint layouts come from there).

Every layer is built under its own seed (``seed`` and its index), so layer ``i`` gets the
same weights on whichever rank builds it, and in :func:`~minipipe.runtime.reference`.

A :class:`TiedLayerSpec` shares one parameter between every layer with the same ``key``
(weight tying: the token embedding reused as the LM head). Its name is the first user's
(``"0.tok.weight"``); a rank holding a later user starts from the first user's values,
broadcast by the rank that holds the first user.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Callable

import torch
import torch.nn as nn

__all__ = ["LayerSpec", "TiedLayerSpec", "SpecModel", "as_specs", "param_bytes"]


class LayerSpec:
    """``typename(*args, **kwargs)``, built later, where it is needed (picklable)."""

    def __init__(self, typename: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> None:
        if not callable(typename):
            raise TypeError(f"LayerSpec needs a module class or factory, got {typename!r}")
        self.typename, self.args, self.kwargs = typename, args, kwargs

    def build(self) -> nn.Module:
        return self.typename(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        name = getattr(self.typename, "__name__", repr(self.typename))
        inner = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{type(self).__name__}({name}({', '.join(inner)}))"


class TiedLayerSpec(LayerSpec):
    """A layer whose parameter ``tied_weight_attr`` is shared by every spec with ``key``."""

    def __init__(self, key: str, typename: Callable[..., nn.Module], *args: Any,
                 tied_weight_attr: str = "weight", **kwargs: Any) -> None:
        super().__init__(typename, *args, **kwargs)
        self.key, self.tied_weight_attr = key, tied_weight_attr


def _set_param(layer: nn.Module, path: str, prm: nn.Parameter) -> None:
    *owner, attr = path.split(".")
    module = layer.get_submodule(".".join(owner)) if owner else layer
    if not isinstance(getattr(module, attr, None), nn.Parameter):
        raise AttributeError(f"{type(layer).__name__} has no parameter {path!r} to tie")
    setattr(module, attr, prm)


class SpecModel:
    """A sequence of layer specifications: the model nobody has to hold whole.

    Args:
        specs: one :class:`LayerSpec` (or :class:`TiedLayerSpec`) per pipeline unit.
        seed: layer ``i`` is built after ``torch.manual_seed(seed * 100_003 + i)``.
    """

    def __init__(self, specs: Iterable[LayerSpec], seed: int = 0) -> None:
        self.specs = list(specs)
        bad = [i for i, s in enumerate(self.specs) if not isinstance(s, LayerSpec)]
        if bad:
            raise TypeError(f"entry {bad[0]} is {self.specs[bad[0]]!r}, not a LayerSpec")
        self.seed = seed
        self.first_use: dict[str, int] = {}  # tie key -> index of its first layer
        for i, s in enumerate(self.specs):
            if isinstance(s, TiedLayerSpec):
                self.first_use.setdefault(s.key, i)

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"SpecModel({len(self)} layers, seed={self.seed})"

    def build(self, indices: Iterable[int], device: torch.device | str | None = None) -> dict[int, nn.Module]:
        """Materialise layers ``indices`` (their own seeds; ties among them share one tensor).

        ``device="meta"`` builds shapes only: no storage, no random numbers drawn.
        """
        out: dict[int, nn.Module] = {}
        tied: dict[str, nn.Parameter] = {}
        for i in indices:
            spec = self.specs[i]
            if str(device) == "meta":
                with torch.device("meta"):
                    layer = spec.build()
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.seed * 100_003 + i)
                    layer = spec.build()
                if device is not None:
                    layer = layer.to(device)
            if isinstance(spec, TiedLayerSpec):
                if spec.key in tied:
                    _set_param(layer, spec.tied_weight_attr, tied[spec.key])
                else:
                    tied[spec.key] = layer.get_parameter(spec.tied_weight_attr)
            out[i] = layer
        return out

    def materialize(self, device: torch.device | str | None = None) -> nn.Sequential:
        """The whole model (what :func:`~minipipe.runtime.reference` trains; ``"meta"``: shapes)."""
        return nn.Sequential(*self.build(range(len(self)), device).values())

    def meta(self) -> nn.Sequential:
        """The whole model on the meta device: every shape, no storage."""
        return self.materialize("meta")

    def names(self, layers: dict[int, nn.Module]) -> dict[int, str]:
        """``id(parameter) -> name`` for built layers; a tied one is named by its first user."""
        names: dict[int, str] = {}
        for i, layer in layers.items():
            spec = self.specs[i]
            for key, prm in layer.named_parameters():
                if isinstance(spec, TiedLayerSpec) and key == spec.tied_weight_attr:
                    first = self.first_use[spec.key]
                    names.setdefault(id(prm), f"{first}.{self.specs[first].tied_weight_attr}")
                else:
                    names.setdefault(id(prm), f"{i}.{key}")
        return names

    def tied(self) -> dict[str, list[int]]:
        """Name of each tied parameter -> the layers that use it (first user first)."""
        out: dict[str, list[int]] = {}
        for i, s in enumerate(self.specs):
            if isinstance(s, TiedLayerSpec):
                first = self.first_use[s.key]
                out.setdefault(f"{first}.{self.specs[first].tied_weight_attr}", []).append(i)
        return out


def as_specs(model: Any) -> SpecModel | None:
    """``model`` as a :class:`SpecModel` if it is given as specifications, else ``None``."""
    if isinstance(model, SpecModel):
        return model
    if isinstance(model, Sequence) and model and all(isinstance(s, LayerSpec) for s in model):
        return SpecModel(model)
    return None


def param_bytes(layers: Iterable[nn.Module]) -> int:
    """Bytes of the distinct parameters of ``layers`` (a tied one counted once)."""
    seen: dict[int, int] = {}
    for layer in layers:
        for p in layer.parameters():
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())
