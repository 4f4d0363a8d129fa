"""Run a schedule on real ranks. Read it in this order:

- :mod:`~minipipe.runtime.config`: every check made before a process starts.
- :mod:`~minipipe.runtime.launch`: start one process per rank (or join torchrun), collect
  results; :mod:`~minipipe.runtime.failures` names the rank that caused a failure.
- :mod:`~minipipe.runtime.comm`: point-to-point messages between neighbouring stages.
- :mod:`~minipipe.runtime.stage`: what one rank holds (its chunks, optimizer, groups).
- :mod:`~minipipe.runtime.interpreter`: one step on one rank: receive, compute, send.
- :mod:`~minipipe.runtime.autograd`: the activation meter and the split backward (B, W).
- :mod:`~minipipe.runtime.caller`: :func:`train` and :func:`reference`;
  :mod:`~minipipe.runtime.result`: :class:`RunResult`.
- beyond the flush: :mod:`~minipipe.runtime.noflush` (1F1B over a stream of micro-batches with
  stashed, double-buffered or no weight versions) and :mod:`~minipipe.runtime.inference`
  (pipelined greedy generation with a KV cache per stage); both reuse the modules above.
"""

from ..errors import ConfigError
from ..partition import split_evenly
from ..state import param_names
from .autograd import ActivationMeter, backward_input, backward_weight
from .caller import reference, train
from .config import check_config
from .job import Job
from .launch import PipelineTimeout, WorkerError
from .result import RunResult
from .stage import StageWorker

__all__ = ["train", "reference", "RunResult", "ConfigError", "check_config", "Job", "StageWorker",
           "ActivationMeter", "backward_input", "backward_weight", "WorkerError",
           "PipelineTimeout", "param_names", "split_evenly"]
