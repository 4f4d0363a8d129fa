"""Plan a real training run: a cost model of transformer layers and a planner on top of it.

- :mod:`~minipipe.planner.costmodel`: :class:`Model`, :class:`Hardware`, per-layer time,
  activation bytes (Korthikanti et al. 2022), optimizer-state bytes, boundary messages.
- :mod:`~minipipe.planner.plan`: :func:`plan` enumerates ``p, v, dp, t``, micro-batch size and
  count, schedule and recomputation; :func:`evaluate` predicts one configuration.
- :mod:`~minipipe.planner.cli`: ``python -m minipipe plan``.

Everything is arithmetic plus :func:`minipipe.simulate`; nothing runs on a device.
"""

from .costmodel import (
                        HARDWARE,
                        MODELS,
                        RECOMPUTE,
                        Hardware,
                        Model,
                        StageCost,
                        activation_bytes_per_layer,
                        block_times,
                        embedding_activation_bytes,
                        head_times,
                        layer_flops,
                        message_bytes,
                        message_time,
                        output_activation_bytes,
                        output_flops,
                        stage_costs,
                        state_bytes_per_param,
                        tensor_parallel_time,
)
from .plan import Config, Estimate, Plan, evaluate, plan

__all__ = ["HARDWARE", "MODELS", "RECOMPUTE", "Hardware", "Model", "StageCost",
           "activation_bytes_per_layer", "block_times", "embedding_activation_bytes",
           "head_times", "layer_flops", "message_bytes", "message_time",
           "output_activation_bytes", "output_flops", "stage_costs", "state_bytes_per_param",
           "tensor_parallel_time", "Config", "Estimate", "Plan", "evaluate", "plan"]
