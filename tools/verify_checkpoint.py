#!/usr/bin/env python
"""Check a checkpoint directory completely and say what it holds.

    python tools/verify_checkpoint.py DIR

DIR: a `--save` directory (follows latest_checkpointed_iteration.txt), one of its iter_N
directories, a checkpoint written by `tools/convert_hf_checkpoint.py import`, or a single-process
model directory (config.json + safetensors). Prints "checkpoint OK: ..." and exits 0, or prints
"checkpoint INVALID: <file>: <problem>" and exits 1. Every data block is re-hashed against the
checksums recorded at save; nothing in the directory is unpickled or executed. See
megatron/training/checkpoint_verify.py for the full list of checks.
"""

from __future__ import annotations

import os
import sys

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isdir(os.path.join(_REPO_ROOT, "megatron")) and _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)  # run as `python tools/verify_checkpoint.py` from a checkout

from megatron.training.checkpoint_verify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
