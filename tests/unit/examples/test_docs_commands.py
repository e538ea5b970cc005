"""Every `bash` block of README.md and examples/deepseek/README.md, run as a new user would where it
can run on CPU: launcher command lines as dry runs (through the training code's parser), the
quickstart as a dry run, preprocessing on a small corpus, checkpoint conversion on a tiny Hugging
Face model. Set-up blocks (network installs) are checked for giving the CPU build. A new block
must be classified here, so no documented command goes untried."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

REPO = Path(__file__).resolve().parents[3]
DOCS = (REPO / "README.md", REPO / "examples" / "deepseek" / "README.md")
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def bash_blocks() -> List[Tuple[str, str]]:
    """(doc#index, text) of every distinct bash block (a block both documents show runs once)."""
    out, seen = [], set()
    for doc in DOCS:
        for i, block in enumerate(re.findall(r"```bash\n(.*?)```", doc.read_text(), re.S)):
            if block not in seen:
                seen.add(block)
                out.append((f"{doc.relative_to(REPO)}#{i}", block))
    return out


def kind(block: str) -> str:
    if "pip install" in block:
        return "setup"
    if "scripts/run_tests.sh" in block:
        return "tests"
    if "scripts/quickstart.sh" in block:
        return "quickstart"
    if "tools/preprocess_data.py" in block:
        return "preprocess"
    if "pretrain_deepseek.sh" in block:
        return "launcher"
    if "tools/convert_hf_checkpoint.py" in block:
        return "convert"
    return "unknown"


BLOCKS = bash_blocks()


def _env(tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HL_", "MASTER_", "OMPI_", "ENV_FLAGS"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", HOME=str(tmp_path), **extra)
    return env


def _localise(block: str, tmp_path: Path) -> str:
    """The block with the repository's files by absolute path, `python` as this interpreter, the
    documentation's example folders under tmp_path and `...` (more settings) dropped."""
    text = block.replace("$PWD/scripts/", f"{REPO}/scripts/").replace("bash examples/", f"bash {REPO}/examples/")
    text = re.sub(r"(^|\s)(\.venv/bin/)?python3? (tools/)", rf"\1{sys.executable} {REPO}/\3", text, flags=re.M)
    for folder in ("/data/ds", "/path/to/tokenizer_dir", "/models/DeepSeek-V2-Lite",
                   "/ckpt/v2lite", "/out/hf", "/shared"):
        text = text.replace(folder, str(tmp_path / folder.strip("/")))
    return text.replace(" ... ", " ")


def _run(script: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euc", script], cwd=tmp_path, env=_env(tmp_path, **env), capture_output=True,
                          text=True, timeout=600)


def test_every_block_is_classified():
    assert BLOCKS and not [name for name, block in BLOCKS if kind(block) == "unknown"]
    assert {kind(b) for _, b in BLOCKS} == {"setup", "tests", "quickstart", "preprocess", "launcher", "convert"}


@pytest.mark.parametrize("name, block", [b for b in BLOCKS if kind(b[1]) == "setup"])
def test_setup_installs_the_cpu_build(name, block):
    torch_lines = [line for line in block.splitlines() if re.search(r"pip install torch\b", line)]
    assert torch_lines and all(CPU_INDEX in line for line in torch_lines), name
    assert "torch==2.13.0" in block  # the version the project's machines carry


@pytest.mark.parametrize("name, block", [b for b in BLOCKS if kind(b[1]) == "launcher"])
def test_launcher_commands_as_dry_runs(name, block, tmp_path):
    script = _localise(block, tmp_path)
    if "HL_TORCHRUN_NODE_RANK=$i" in script:
        script = f"for i in 0 1; do\n{script}\ndone"
    proc = _run(script, tmp_path, HL_DRY_RUN="1", HL_CHECK_PATHS="0", HL_PRECHECK="1", HL_PYTHON=sys.executable,
                HL_RESULTS_DIR_PREFIX=str(tmp_path / "res"))
    assert proc.returncode == 0, (name, proc.stderr[-3000:])
    commands = [line for line in proc.stdout.splitlines() if "pretrain_gpt.py" in line]
    assert len(commands) == (2 if "$i" in block else 1), proc.stdout


@pytest.mark.parametrize("name, block", [b for b in BLOCKS if kind(b[1]) == "quickstart"])
def test_quickstart_command_as_a_dry_run(name, block, tmp_path):
    venv = os.path.relpath(Path(sys.executable).parents[1], REPO)
    proc = _run(block.replace("bash scripts/", f"bash {REPO}/scripts/"), tmp_path, QUICKSTART_DRY_RUN="1",
                VENV=venv, QUICKSTART_OUT=str(tmp_path / "qs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--model-preset tiny" in proc.stdout and "--train-iters 300" in proc.stdout


@pytest.fixture(scope="module")
def tokenizer_and_corpus(tmp_path_factory) -> Path:
    """corpus.jsonl and a small byte-level BPE tokenizer at path/to/tokenizer_dir, in one folder."""
    root = tmp_path_factory.mktemp("docs_data")
    corpus = root / "corpus.jsonl"
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_quickstart_corpus.py"), "--output", str(corpus),
                    "--max-mb", "0.05"], check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, str(REPO / "scripts" / "train_quickstart_tokenizer.py"), "--input", str(corpus),
                    "--output", str(root / "path" / "to" / "tokenizer_dir"), "--vocab-size", "400"],
                   check=True, capture_output=True, timeout=300)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name, block", [b for b in BLOCKS if kind(b[1]) == "preprocess"])
def test_preprocess_commands(name, block, tokenizer_and_corpus, tmp_path):
    (tmp_path / "corpus.jsonl").write_bytes((tokenizer_and_corpus / "corpus.jsonl").read_bytes())
    (tmp_path / "path" / "to").mkdir(parents=True)
    (tmp_path / "path" / "to" / "tokenizer_dir").symlink_to(tokenizer_and_corpus / "path" / "to" / "tokenizer_dir")
    (tmp_path / "data").mkdir()
    script = _localise(block, tmp_path).replace("--workers 8", "--workers 2")
    (tmp_path / "data" / "ds").mkdir()
    proc = _run(script, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    prefix = re.search(r"--output-prefix (\S+)", script).group(1)
    for ext in ("bin", "idx"):
        path = Path(prefix if os.path.isabs(prefix) else tmp_path / prefix)
        assert Path(f"{path}_text_document.{ext}").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize("name, block", [b for b in BLOCKS if kind(b[1]) == "convert"])
def test_convert_commands_on_a_tiny_model(name, block, tmp_path):
    import json

    from tests.unit.core.models.hf_tiny import build_hf

    build_hf("v2_lite", seed=1).save_pretrained(str(tmp_path / "models" / "DeepSeek-V2-Lite"))
    proc = _run(_localise(block, tmp_path), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "hf" / "config.json").read_text())["model_type"] == "deepseek_v2"
    # "To continue training from an imported checkpoint, pass it as HL_LOAD_DIR": the launcher takes its model
    launcher = subprocess.run(
        ["bash", str(REPO / "examples" / "deepseek" / "pretrain_deepseek.sh")], cwd=tmp_path, capture_output=True,
        text=True, timeout=120,
        env=_env(tmp_path, HL_DRY_RUN="1", HL_PRECHECK="1", HL_PYTHON=sys.executable, HL_MOCK_DATA="1",
                 HL_LOAD_DIR=str(tmp_path / "ckpt" / "v2lite"), HL_DEVICE="cpu", HL_DP="2", HL_TP="1", HL_PP="1",
                 HL_EP="2", HL_DEVICES_PER_NODE="2", HL_SEQ_LEN="32", HL_GBS="4", HL_TOKENIZER_TYPE="NullTokenizer",
                 HL_VOCAB_SIZE="100", HL_RESULTS_DIR_PREFIX=str(tmp_path / "res")))
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    config = json.loads((tmp_path / "models" / "DeepSeek-V2-Lite" / "config.json").read_text())
    model_line = next(line for line in launcher.stdout.splitlines() if line.startswith("model: "))
    assert "from the checkpoint in" in model_line and f"layers={config['num_hidden_layers']}" in model_line
    assert "--use-checkpoint-args" in launcher.stdout
