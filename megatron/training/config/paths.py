"""File-system checks of a run's paths, made when arguments are parsed (skippable with
`check_paths=False`, e.g. to check a job on a machine that does not see the cluster's files)."""

from __future__ import annotations

import os
from typing import Optional

from megatron.core.datasets.dataset_config import parse_data_path
from megatron.training.config.run import RunConfig
from megatron.training.config.tokenizer_flags import tokenizer_file_requirements


def check_run_paths(run: RunConfig) -> None:
    """Raise ValueError (one line, naming the flag) for the first path that cannot work."""
    c = run.checkpoint
    _check_output_dir("--save", c.save)
    if c.load is not None and os.path.exists(c.load) and not os.path.isdir(c.load):
        raise ValueError(f"--load {c.load!r} is not a directory")
    if c.load is not None and c.exit_on_missing_checkpoint and not os.path.isdir(c.load):
        raise ValueError(f"--load {c.load!r} does not exist and --exit-on-missing-checkpoint is set")
    for flag, values in run.data.blends().items():
        for _, prefix in parse_data_path(list(values)):
            if not (os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx")):
                raise ValueError(f"{flag} prefix {prefix!r}: {prefix}.bin / {prefix}.idx not found")
    for flag, path in (("--data-cache-path", run.data.data_cache_path), ("--tensorboard-dir", run.logging.tensorboard_dir)):
        if path is not None and os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag} {path!r} exists and is not a directory")
    tok = run.tokenizer
    for field, flag, kind in tokenizer_file_requirements(tok.tokenizer_type):
        path = getattr(tok, field)
        ok = os.path.isdir(path) if kind == "dir" else os.path.isfile(path)
        if not ok:
            what = "an existing directory" if kind == "dir" else "an existing file"
            raise ValueError(f"{flag} {path!r} for {tok.tokenizer_type} must be {what}")


def _nearest_existing(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def _check_output_dir(flag: str, path: Optional[str]) -> None:
    """`path` is, or can be created as, a writable directory (nothing is created here)."""
    if path is None:
        return
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} exists and is not a directory")
    base = _nearest_existing(path)
    if not os.path.isdir(base) or not os.access(base, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path!r} cannot be written ({base!r} is not a writable directory)")
