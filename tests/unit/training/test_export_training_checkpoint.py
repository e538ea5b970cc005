"""A training checkpoint (torch_dist) exports to a Hugging Face checkpoint that transformers loads
and that gives our model's logits."""

from pathlib import Path

import torch

from megatron.training.checkpointing import load_full_model
from megatron.training.training import pretrain
from tools import convert_hf_checkpoint

REPO = Path(__file__).resolve().parents[3]

FLAGS = ["--model-preset", "tiny", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-layers", "2",
         "--moe-ffn-hidden-size", "32", "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "127", "--device", "cpu", "--log-interval", "1",
         "--num-workers", "0", "--mock-data", "--train-iters", "2", "--eval-interval", "1000", "--eval-iters", "0",
         "--lr", "1e-3", "--mtp-num-layers", "0", "--save-interval", "1000"]


def test_training_checkpoint_exports_to_hf(tmp_path):
    from transformers import AutoModelForCausalLM

    save = tmp_path / "run"
    pretrain([*FLAGS, "--save", str(save)])
    assert convert_hf_checkpoint.main(["export", "--checkpoint", str(save), "--hf-path", str(tmp_path / "hf")]) == 0
    ours, config = load_full_model(str(save))
    hf, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), output_loading_info=True, attn_implementation="eager")
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tokens = torch.randint(0, 127, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours.eval()(tokens).logits
    assert ((got - want).norm() / want.norm()).item() < 1e-5
    # The exported weights are the trained ones, not the initial ones.
    assert config.num_layers == 2 and hf.config.num_hidden_layers == 2
