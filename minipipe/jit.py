"""Compile a hot loop with numba on first use, or run it as plain Python without numba.

Two loops run once per action at cluster sizes (half a million actions at ``p = 64,
m = 1024``): the simulator's event loop (:mod:`minipipe.dataflow`) and the zero-bubble
generators' W-filling rule (:mod:`minipipe.schedules.zero_bubble`). Each is written once, as
plain Python over numpy arrays that numba can compile; ``numba.njit(cache=True)`` keeps the
machine code on disk, so only the first run on a machine pays for compiling (a second or two).
Without numba (it is in requirements.txt) the same functions run as Python, ~100× slower,
with identical results; the tests compare the two.
"""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["jit"]


class jit:  # noqa: N801 (used as a decorator)
    """``@jit`` on a function: compiled by numba the first time it is called."""

    def __init__(self, fn: Callable) -> None:
        self.py_func = fn  #: the plain Python function (what the tests compare with)
        self._compiled: Callable | None = None
        self.__doc__, self.__name__ = fn.__doc__, fn.__name__

    @property
    def compiled(self) -> Callable:
        """The numba-compiled function, or the plain one when numba is not installed."""
        if self._compiled is None:
            try:
                import numba  # noqa: PLC0415 (0.3 s to import: only when first needed)
            except ImportError:  # pragma: no cover - numba is in requirements.txt
                self._compiled = self.py_func
            else:
                self._compiled = numba.njit(cache=True, nogil=True)(self.py_func)
        return self._compiled

    def __call__(self, *args):
        return self.compiled(*args)
