"""Where each step's batch comes from: read on the ranks that need it, one step at a time.

``train`` accepts data in five forms; :func:`as_loader` turns each into a :class:`Loader`, a
small picklable description that every rank *opens* itself:

- one ``(inputs, targets)`` batch (repeated every step) or a list of batches (shipped whole:
  fine for a lesson's three steps);
- a ``torch.utils.data.Dataset`` of ``(x, y)`` samples, via :func:`from_dataset`
  (seeded shuffling per epoch, repeating like DeepSpeed's ``RepeatingLoader``);
- a ``DataLoader`` (must be deterministic: no unseeded shuffling), repeated;
- a picklable callable returning an iterator of batches (:class:`Stream`), or a function of
  the step index (:func:`per_step`).

Only the rank holding the first stage reads inputs and only the rank holding the last stage
reads targets; the others open nothing. Nothing materialises all steps up front, so start-up
and memory do not grow with ``steps``. Every rank that reads step ``k`` gets the same batch;
replica ``d`` of ``dp`` takes rows ``d·B/dp:(d+1)·B/dp`` of it, a disjoint share.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch

from .errors import ConfigError
from .structure import rows, take_rows

__all__ = ["Loader", "Batches", "Stream", "per_step", "from_dataset", "as_loader", "share"]

Batch = tuple[torch.Tensor, torch.Tensor]


def share(batch: Batch, replica: int, replicas: int) -> Batch:
    """Rows ``replica·B/replicas : (replica+1)·B/replicas`` of both halves of ``batch``."""
    n = rows(batch[0]) // replicas
    return take_rows(batch[0], replica * n, (replica + 1) * n), take_rows(batch[1], replica * n, (replica + 1) * n)


class Loader:
    """A data source a rank opens for itself. ``steps``: its length, or None (endless)."""

    steps: int | None = None

    def batches(self) -> Iterator[Batch]:
        """The whole batches, step after step (every replica's rows)."""
        raise NotImplementedError

    def open(self, replica: int = 0, replicas: int = 1, steps: int | None = None) -> Iterator[Batch]:
        """This replica's share of each of the first ``steps`` batches."""
        it = self.batches() if steps is None else itertools.islice(self.batches(), steps)
        return (share(b, replica, replicas) for b in it)

    def sample(self) -> list[Batch]:
        """What the caller checks before start: step 0's batch (in-memory batches: all)."""
        return [next(iter(self.batches()))]


class Batches(Loader):
    """Batches given in memory: a list, or one batch repeated ``steps`` times."""

    def __init__(self, batches: Sequence[Batch], repeat: int | None = None) -> None:
        self.items = list(batches)
        self.steps = len(self.items) if repeat is None else repeat
        self.repeat = repeat is not None

    def sample(self) -> list[Batch]:
        return self.items

    def batches(self) -> Iterator[Batch]:
        if self.repeat:
            return itertools.repeat(self.items[0], self.steps)
        return iter(self.items)


class Stream(Loader):
    """``factory()`` returns an iterator of batches; restarted when it runs out (an epoch)."""

    def __init__(self, factory: Callable[[], Any], steps: int | None = None) -> None:
        self.factory, self.steps = factory, steps

    def batches(self) -> Iterator[Batch]:
        while True:
            empty = True
            for b in self.factory():
                empty = False
                yield tuple(b)  # type: ignore[misc]
            if empty:
                raise ConfigError(f"the data factory {self.factory!r} returned no batch")


class _PerStep:
    def __init__(self, fn: Callable[[int], Batch]) -> None:
        self.fn = fn

    def __call__(self) -> Iterator[Batch]:
        return (self.fn(k) for k in itertools.count())


def per_step(fn: Callable[[int], Batch], steps: int | None = None) -> Stream:
    """Step ``k``'s batch is ``fn(k)``: deterministic, nothing stored."""
    return Stream(_PerStep(fn), steps)


class _Epochs:
    """Seeded shuffled batches of a Dataset, epoch after epoch (drops the last partial one)."""

    def __init__(self, dataset: Any, batch_size: int, shuffle: bool, seed: int) -> None:
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, batch_size, shuffle, seed

    def __call__(self) -> Iterator[Batch]:
        n = len(self.dataset)
        if n < self.batch_size:
            raise ConfigError(f"the dataset has {n} samples, fewer than one batch of {self.batch_size}")
        for epoch in itertools.count():
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
            for k in range(n // self.batch_size):
                idx = order[k * self.batch_size:(k + 1) * self.batch_size].tolist()
                xs, ys = zip(*(self.dataset[i] for i in idx))
                yield torch.stack(xs), torch.stack(ys)


def from_dataset(dataset: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 steps: int | None = None) -> Stream:
    """Batches of ``batch_size`` ``(x, y)`` samples of ``dataset``, reshuffled every epoch."""
    return Stream(_Epochs(dataset, batch_size, shuffle, seed), steps)


class _Repeat:
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __call__(self) -> Iterator[Batch]:
        return iter(self.loader)


def as_loader(data: Any, steps: int | None = None) -> Loader:
    """Any accepted form of ``data`` as a :class:`Loader` with a known number of steps."""
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Loader):
        loader = data
    elif isinstance(data, tuple) and len(data) == 2 and any(isinstance(d, (torch.Tensor, dict))
                                                             for d in data):  # one batch
        loader = Batches([data], repeat=steps or 1)
    elif isinstance(data, DataLoader):
        loader = Stream(_Repeat(data))
    elif isinstance(data, Dataset):
        raise ConfigError("a Dataset needs a batch size: pass minipipe.loaders.from_dataset("
                          "dataset, batch_size) or a DataLoader")
    elif callable(data):
        loader = Stream(data)
    elif hasattr(data, "__next__"):  # an iterator: single use, so its steps are read here
        if steps is None:
            raise ConfigError("data is an iterator without a length (a generator, or an endless "
                              "stream such as itertools.cycle(loader)): say how many steps to "
                              "take from it with steps=N")
        loader = Batches(list(itertools.islice(data, steps)))
    elif isinstance(data, Sequence):
        loader = Batches(data)
    else:
        raise ConfigError(f"data must be a batch, a list of batches, a Dataset/DataLoader or a "
                          f"callable returning an iterator, not {type(data).__name__}")
    total = steps if steps is not None else loader.steps
    if total is None:
        raise ConfigError(f"{type(data).__name__} data has no length: pass steps=")
    if loader.steps is not None and total > loader.steps:
        raise ConfigError(f"steps={total} but only {loader.steps} batches were given")
    if total < 1:
        raise ConfigError("data holds no batches: give one (inputs, targets) batch or a list"
                          if steps is None else f"steps must be >= 1, got {total}")
    return _Limited(loader, total)


class _Limited(Loader):
    """``loader`` cut to ``steps`` steps."""

    def __init__(self, loader: Loader, steps: int) -> None:
        self.inner, self.steps = loader, steps

    def sample(self) -> list[Batch]:
        return self.inner.sample()[:self.steps]

    def batches(self) -> Iterator[Batch]:
        return itertools.islice(self.inner.batches(), self.steps)
