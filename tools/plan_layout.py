#!/usr/bin/env python
"""Know before you launch: memory, communication and step-time plan of a DeepSeek layout.

    python tools/plan_layout.py --model v3 --device-type gaudi3 --num-devices 64 \
        --pipeline-model-parallel-size 8 --expert-model-parallel-size 8 \
        --micro-batch-size 1 --global-batch-size 512 --seq-length 4096 --bf16 --use-distributed-optimizer
    python tools/plan_layout.py --model v2-lite --device-type h100 --search 16 --global-batch-size 256

Takes pretrain_gpt.py's flags (see megatron/training/planning/cli.py). Exit status: 0 fits
(--search: some layout fits), 2 does not fit, 1 bad flags.
"""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from megatron.training.planning.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
