"""scripts/quickstart.sh honours an absolute QUICKSTART_OUT (it used to be joined onto the
repository path). Dry run: the launch command is printed, with every path under QUICKSTART_OUT."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.unit.tools.preprocess_testlib import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not os.path.isfile(os.path.join(REPO_ROOT, ".venv", "bin", "python")),
                    reason="quickstart.sh runs in the repository's .venv (scripts/run_tests.sh creates it)")
def test_absolute_quickstart_out(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, "QUICKSTART_OUT": str(out), "QUICKSTART_DRY_RUN": "1", "QUICKSTART_CORPUS_MB": "0.2"}
    proc = subprocess.run(["bash", os.path.join(REPO_ROOT, "scripts", "quickstart.sh")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"--data-path {out}/data/corpus_text_document " in proc.stdout
    assert f"--tokenizer-model {out}/tokenizer " in proc.stdout
    assert f"--data-cache-path {out}/data/cache " in proc.stdout and f"--save {out}/run_" in proc.stdout
    assert not os.path.exists(os.path.join(REPO_ROOT, str(out).lstrip("/")))
