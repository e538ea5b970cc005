"""Pipeline parallelism: the layer split over stages, stage-to-stage P2P transfers, and the
micro-batch schedules (gradient accumulation for PP=1, 1F1B for PP>1).

Stage modules take their input through ``model.set_input_tensor``; see `schedules` for the
forward-step / loss-function protocol and how losses are scaled over micro-batches.
"""

from megatron.core.pipeline_parallel.p2p import P2PCommunicator
from megatron.core.pipeline_parallel.partition import (
    StageInfo,
    describe_stages,
    format_stage_map,
    stage_layer_ranges,
)
from megatron.core.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_1f1b,
    get_forward_backward_func,
)

__all__ = [
    "P2PCommunicator",
    "StageInfo",
    "describe_stages",
    "format_stage_map",
    "forward_backward_no_pipelining",
    "forward_backward_pipelining_1f1b",
    "get_forward_backward_func",
    "stage_layer_ranges",
]
