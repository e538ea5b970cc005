"""tools/generate.py end to end: a tiny HF directory with its tokenizer, and a tiny training
checkpoint (torch_dist, NullTokenizer saved with its run arguments)."""

from __future__ import annotations

import dataclasses
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron.core.config import MTPConfig
from megatron.core.inference import generate, score_tokens
from megatron.core.models.deepseek import (
    DeepSeekModel,
    config_from_hf,
    load_hf_checkpoint,
)
from megatron.training.arguments import parse_args
from megatron.training.checkpointing import save_checkpoint
from megatron.training.tokenizer import HuggingFaceTokenizer
from tests.unit.core.models.hf_tiny import build_hf
from tests.unit.inference.tiny import WORDS, save_word_tokenizer
from tools import generate as cli

REPO = Path(__file__).resolve().parents[3]
PROMPTS = ["the cat sits on the", "a big dog", "rain"]
PROMPT_FLAGS = [arg for p in PROMPTS for arg in ("--prompt", p)]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A tiny V3 model (96 embedding rows) and a 61-id word tokenizer in one directory."""
    d = tmp_path_factory.mktemp("hf_cli")
    build_hf("v3").save_pretrained(str(d))
    save_word_tokenizer(d)
    return d


def run_cli(capsys, argv, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_hf_dir_matches_library(hf_dir, capsys):
    code, out, err = run_cli(capsys, ["--hf-path", str(hf_dir), *PROMPT_FLAGS,
                                      "--max-new-tokens", "12", "--output-format", "jsonl"])
    assert code == 0, err
    assert "tokens/s" in err
    rows = [json.loads(line) for line in out.splitlines()]
    tok = HuggingFaceTokenizer(str(hf_dir))
    model, _ = load_hf_checkpoint(str(hf_dir))
    vocab = len(WORDS) + 3
    want = generate(model.eval(), [tok.tokenize(p) for p in PROMPTS], 12, eod=tok.eod, vocab_size=vocab)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["tokens"] for r in rows] == want
    assert all(t < vocab for w in want for t in w)  # 35 padding rows of the embedding never chosen
    for row in rows:
        tokens = row["tokens"][:-1] if row["tokens"] and row["tokens"][-1] == tok.eod else row["tokens"]
        assert row["continuation"] == tok.detokenize(tokens)
    # Plain text output: one line per prompt, the same continuations.
    code, text, _ = run_cli(capsys, ["--hf-path", str(hf_dir), *PROMPT_FLAGS,
                                     "--max-new-tokens", "12"])
    assert code == 0 and text.splitlines() == [r["continuation"] for r in rows]


def test_cli_stop_strings_stdin_file_and_sampling(hf_dir, capsys, monkeypatch, tmp_path):
    base = ["--hf-path", str(hf_dir), "--max-new-tokens", "12", "--output-format", "jsonl"]
    _, out, _ = run_cli(capsys, [*base, "--prompt", PROMPTS[0]])
    full = json.loads(out)["continuation"]
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    _, out, _ = run_cli(capsys, [*base, "--prompt", PROMPTS[0], "--stop", stop, "--stop", "never-there"])
    cut = json.loads(out)["continuation"]
    assert cut == full[: full.index(stop)] and stop not in cut
    # Prompts from stdin and from a file, one per non-empty line.
    code, out, _ = run_cli(capsys, [*base, "--prompt", "-"], stdin="\n".join(PROMPTS) + "\n\n", monkeypatch=monkeypatch)
    from_stdin = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["prompt"] for r in from_stdin] == PROMPTS
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("\n".join(PROMPTS) + "\n")
    _, out, _ = run_cli(capsys, [*base, "--prompt-file", str(prompt_file)])
    assert [json.loads(line) for line in out.splitlines()] == from_stdin
    # Seeded sampling is reproducible and differs from greedy.
    sample = [*base, "--prompt", PROMPTS[1], "--temperature", "1.5", "--top-k", "20", "--top-p", "0.9", "--seed"]
    a = run_cli(capsys, [*sample, "4"])[1]
    assert a == run_cli(capsys, [*sample, "4"])[1]
    assert a != run_cli(capsys, [*base, "--prompt", PROMPTS[1]])[1] or a != run_cli(capsys, [*sample, "5"])[1]


def test_cli_perplexity(hf_dir, capsys, tmp_path):
    text = " ".join(WORDS[i % len(WORDS)] for i in range(0, 300, 7))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    code, out, err = run_cli(capsys, ["--hf-path", str(hf_dir), "--perplexity", str(corpus), "--max-length", "16",
                                      "--batch-size", "2"])
    assert code == 0 and "tokens/s" in err
    fields = out.split()
    tok = HuggingFaceTokenizer(str(hf_dir))
    model, _ = load_hf_checkpoint(str(hf_dir))
    ids = tok.tokenize(text)
    want = score_tokens(model.eval(), ids, 16, 1, vocab_size=len(WORDS) + 3)
    assert int(fields[fields.index("tokens") + 1]) == len(ids) - 1 == want.num_tokens
    assert abs(float(fields[fields.index("loss") + 1]) - want.loss) < 1e-5
    assert abs(float(fields[fields.index("perplexity") + 1]) - want.perplexity) < 1e-3 * want.perplexity


@pytest.fixture(scope="module")
def training_checkpoint(tmp_path_factory):
    """A torch_dist checkpoint of a tiny V3 model with one MTP depth, saved by one process with
    run arguments naming a NullTokenizer of 90 ids (+ eod = 90)."""
    config = dataclasses.replace(config_from_hf(build_hf("v3").config), mtp=MTPConfig(num_layers=1))
    torch.manual_seed(11)
    model = DeepSeekModel(config).eval()
    flags = ["--model-preset", "tiny", "--seq-length", "16", "--micro-batch-size", "1", "--train-iters", "1",
             "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "90"]
    run = dataclasses.replace(parse_args(flags, world_size=1, check_paths=False), model=config)
    save = tmp_path_factory.mktemp("ckpt")
    save_checkpoint(str(save), 5, [model], None, None, run, None, None)
    return save, model


def test_cli_training_checkpoint(training_checkpoint, capsys, tmp_path):
    save, model = training_checkpoint
    prompts = [[5, 7, 9, 11], [42], [80, 3, 3]]
    argv = ["--load", str(save), "--max-new-tokens", "10", "--output-format", "jsonl"]
    for p in prompts:
        argv += ["--prompt", " ".join(map(str, p))]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    want = generate(model, prompts, 10, eod=90, vocab_size=91)
    assert [r["tokens"] for r in rows] == want
    assert [r["continuation"] for r in rows] == [" ".join(map(str, w[:-1] if w[-1] == 90 else w)) for w in want]
    # Self-speculative decoding with the checkpoint's MTP depth: the same tokens.
    code, spec_out, _ = run_cli(capsys, [*argv, "--speculative"])
    assert code == 0 and spec_out == out
    corpus = tmp_path / "ids.txt"
    corpus.write_text(" ".join(str((i * 13) % 90) for i in range(40)))
    code, ppl, _ = run_cli(capsys, ["--load", str(save), "--perplexity", str(corpus)])
    want_ppl = score_tokens(model, [(i * 13) % 90 for i in range(40)], vocab_size=91)
    assert code == 0 and f"loss {want_ppl.loss:.6f}" in ppl


def test_cli_errors(hf_dir, capsys, tmp_path):
    code, _, err = run_cli(capsys, ["--load", str(tmp_path), "--prompt", "1 2", "--max-new-tokens", "4"])
    assert code == 2 and f"--load {tmp_path}" in err
    code, _, err = run_cli(capsys, ["--hf-path", str(hf_dir), "--max-new-tokens", "4"])
    assert code == 2 and "no prompts" in err
    code, _, err = run_cli(capsys, ["--hf-path", str(hf_dir), "--prompt", "cat"])
    assert code == 2 and "--max-new-tokens" in err
    code, _, err = run_cli(capsys, ["--hf-path", str(hf_dir), "--prompt", "cat", "--max-new-tokens", "4",
                                    "--temperature", "-1"])
    assert code == 2 and "temperature" in err


def test_cli_runs_as_a_script_with_stdin(hf_dir):
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "generate.py"), "--hf-path", str(hf_dir), "--prompt", "-",
         "--max-new-tokens", "5"],
        input="the cat\nsun\n", capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 2 and "tokens/s" in proc.stderr
