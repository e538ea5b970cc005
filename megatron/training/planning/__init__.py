"""Know before you launch: memory, communication and step time of a training layout.

    from megatron.training.arguments import parse_args
    from megatron.training.planning import format_plan, plan_for_run

    run = parse_args(argv, world_size, check_paths=False)
    plan = plan_for_run(run, "gaudi3")
    print(format_plan(plan))            # per stage: parameters, memory by kind, traffic; step time; fit
    plan.to_dict()                      # the same as one JSON-able dict

Modules: params (parameter inventory per stage and rank), buffers (DDP gradient buffers and
optimizer shards), activations (bytes kept for backward), memory (peaks per stage), comm (bytes
per process group), timing (step-time estimate), devices (vendor figures), plan (assembly and
text), search (ranked layouts), cli (tools/plan_layout.py), measure (checks against real runs).
"""

from megatron.training.planning.devices import DEVICE_TYPES, DEVICES, DeviceSpec, get_device
from megatron.training.planning.plan import Plan, format_plan, plan_for_run, plan_layout

__all__ = ["DEVICES", "DEVICE_TYPES", "DeviceSpec", "Plan", "format_plan", "get_device", "plan_for_run", "plan_layout"]
