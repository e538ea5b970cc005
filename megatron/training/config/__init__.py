"""A training run's configuration: frozen sections built from Megatron's flags.

`arguments.parse_args` is the one route from a command line to a `RunConfig`; see `run.py` for
the whole, `sections.py` for the sections, `model_flags.py` for the model section.
"""

from megatron.training.config.flat import FLAT_FORMAT, flatten_dataclass, from_flat_dict, to_flat_dict
from megatron.training.config.run import RunConfig, format_run_config
from megatron.training.config.sections import (
    DEFAULT_SPLIT,
    CheckpointConfig,
    DataConfig,
    DeviceConfig,
    DistributedConfig,
    LoggingConfig,
    OptimizerConfig,
    SchedulerConfig,
    TrainingConfig,
)

__all__ = [
    "DEFAULT_SPLIT",
    "FLAT_FORMAT",
    "CheckpointConfig",
    "DataConfig",
    "DeviceConfig",
    "DistributedConfig",
    "LoggingConfig",
    "OptimizerConfig",
    "RunConfig",
    "SchedulerConfig",
    "TrainingConfig",
    "flatten_dataclass",
    "format_run_config",
    "from_flat_dict",
    "to_flat_dict",
]
