"""End to end: corpus -> BPE tokenizer (HF dir) -> preprocess_data -> torchrun 2 ranks, EP 2."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dist_utils import free_port

REPO = Path(__file__).resolve().parents[3]


def _corpus(path: Path, docs: int = 300) -> None:
    words = "the cat sat on a mat and the dog ran to the red ball while birds sang in tall green trees".split()
    with path.open("w") as f:
        for i in range(docs):
            text = " ".join(words[(i + j) % len(words)] for j in range(40))
            f.write(json.dumps({"text": text}) + "\n")


def _tokenizer(corpus: Path, out: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<|endoftext|>"])
    tok.train_from_iterator((json.loads(l)["text"] for l in corpus.open()), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>").save_pretrained(out)


@pytest.mark.slow
def test_pretrain_two_ranks_loss_falls(tmp_path):
    corpus, tok_dir = tmp_path / "corpus.jsonl", tmp_path / "tok"
    _corpus(corpus)
    _tokenizer(corpus, tok_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "tools/preprocess_data.py"), "--input", str(corpus),
                    "--output-prefix", str(tmp_path / "data"), "--tokenizer-type", "HuggingFaceTokenizer",
                    "--tokenizer-model", str(tok_dir), "--append-eod", "--workers", "1"],
                   check=True, env=env, cwd=REPO, timeout=120)
    tb = tmp_path / "tb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(REPO / "pretrain_gpt.py"),
           "--model-preset", "tiny", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-layers", "2",
           "--moe-ffn-hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "8",
           "--expert-model-parallel-size", "2", "--train-iters", "30", "--lr", "3e-3", "--lr-warmup-iters", "3",
           "--min-lr", "3e-4", "--lr-decay-style", "cosine", "--data-path", str(tmp_path / "data_text_document"),
           "--split", "98,2,0", "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tok_dir),
           "--device", "cpu", "--log-interval", "1", "--eval-interval", "15", "--eval-iters", "1",
           "--num-workers", "0", "--tensorboard-dir", str(tb), "--seed", "7"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(x) for x in re.findall(r"\| lm loss: (\S+) \|", proc.stdout)]
    assert len(losses) == 30, proc.stdout[-3000:]
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert list(tb.glob("events.out.tfevents.*")), list(tb.iterdir())
