#!/usr/bin/env python
"""Pre-train a DeepSeek-V3/V2 style MoE model (Megatron-LM's `pretrain_gpt.py` entry point).

    torchrun --nproc_per_node 8 pretrain_gpt.py --model-preset tiny --seq-length 512 ...
"""

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from megatron.training.training import pretrain  # noqa: E402

if __name__ == "__main__":
    pretrain()
