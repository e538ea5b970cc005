#!/usr/bin/env python
"""Pre-train a DeepSeek-V3/V2 style MoE model (Megatron-LM's `pretrain_gpt.py` entry point).

    torchrun --nproc_per_node 8 pretrain_gpt.py --model-preset tiny --seq-length 512 ...

Every rank runs this file. A user error (a bad flag or layout: ValueError; a missing file:
FileNotFoundError; an unusable checkpoint: CheckpointError) is printed as one line,
`error: <message>`, by rank 0, and every rank exits with status 2. Any other exception keeps
its traceback.

Ranks other than 0 meet the same configuration errors as rank 0, so they stay silent at first:
the launcher stops them as soon as rank 0 has exited. A rank that is still running
USER_ERROR_GRACE_S seconds later met an error of its own (a file missing on its node, say) and
prints it itself.
"""

import os
import re
import sys
import time

_REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

USER_ERROR_EXIT_CODE = 2
USER_ERROR_GRACE_S = 10.0
# Rank variables of torchrun, Open MPI and MPICH / Intel MPI, in that order.
_RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launcher_rank(env=None) -> int:
    """This process's global rank from the launcher's environment (0 when none is set).

    Read from the environment because a user error can happen before the process group exists.
    """
    env = os.environ if env is None else env
    for name in _RANK_VARIABLES:
        value = env.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def user_errors() -> tuple:
    """The exception types reported as one line instead of a traceback."""
    from megatron.training.checkpoint_io import CheckpointError

    return (ValueError, FileNotFoundError, CheckpointError)


def one_line(error: BaseException) -> str:
    """`error: <message>` on a single line (line breaks inside the message become spaces)."""
    message = re.sub(r"\s*\n\s*", " ", str(error).strip()) or type(error).__name__
    return f"error: {message}"


def main(train=None, argv=None, env=None, grace_s: float = USER_ERROR_GRACE_S) -> int:
    """Run `train(argv)` (default: megatron.training.training.pretrain); the process exit status."""
    if train is None:
        from megatron.training.training import pretrain as train
    reported = user_errors()
    try:
        train(argv)
    except reported as error:
        if launcher_rank(env) != 0 and grace_s > 0:
            time.sleep(grace_s)
        print(one_line(error), file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
