"""Run a Python script and report its peak memory.

    python scripts/peak_rss.py SCRIPT [ARGS...]

Runs SCRIPT as `__main__` in this process (with the folder above SCRIPT's folder importable, as
for `<repo>/tools/<tool>.py`), then prints, as the last line of stdout, the peak resident set size
in kB: this process's own (VmHWM) or its largest child's (worker processes), whichever is larger.
(Measured inside the process because the parent's wait4 ru_maxrss would include the pre-exec
size of the forking parent.)
Exits with SCRIPT's exit status. Linux only (reads /proc/self/status). Used by the memory tests
and benchmarks of tools/preprocess_data.py.
"""

from __future__ import annotations

import os
import resource
import runpy
import sys


def peak_rss_kb() -> int:
    with open("/proc/self/status") as f:
        own = int(next(line.split()[1] for line in f if line.startswith("VmHWM:")))
    return max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)


def main() -> int:
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(sys.argv[0]))))
    code = 0
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code
    sys.stdout.flush()
    print(peak_rss_kb())
    if isinstance(code, str):  # sys.exit("message"), as Python itself reports it
        print(code, file=sys.stderr)
        return 1
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
