"""tools/convert_hf_checkpoint.py and tools/compare_with_hf.py on tiny random HF DeepSeek-V3 / V2-Lite
models: import writes a training checkpoint that verify, export and compare accept; export infers
the HF model type; both kinds of our checkpoints are accepted and named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tools import compare_with_hf, convert_hf_checkpoint

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
WORDS = ["hello", "world", "deep", "seek", "mixture", "of", "experts", "latent", "attention"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> str:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, num_nextn_predict_layers=0,
    )
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(config)
    with torch.no_grad():
        model.model.layers[1].mlp.gate.e_score_correction_bias.normal_(0.0, 0.05)
    path = str(tmp_path_factory.mktemp("hf"))
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def our_dir(hf_dir, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("ours"))
    assert convert_hf_checkpoint.main(["import", "--hf-path", hf_dir, "--output", path]) == 0
    return path


def test_import_export_round_trip(hf_dir, our_dir, tmp_path, capsys):
    from megatron.training.checkpoint_export import export_full_state_dict
    from megatron.training.checkpoint_verify import main as verify_main

    assert sorted(os.listdir(our_dir)) == ["iter_0000000", "latest_checkpointed_iteration.txt"]
    assert verify_main([our_dir]) == 0
    assert "weights-only checkpoint (imported), iteration 0" in capsys.readouterr().out
    ours = export_full_state_dict(our_dir)
    assert ours["layers.1.mlp.experts.gate_up_proj"].shape == (4, 32, 32)
    out = str(tmp_path / "hf")
    assert convert_hf_checkpoint.main(["export", "--checkpoint", our_dir, "--hf-path", out, "--max-shard-size", "20KB"]) == 0
    assert "deepseek_v3, from the checkpoint" in capsys.readouterr().out
    from megatron.core.models.deepseek.hf_io import SafetensorsReader

    with SafetensorsReader(out) as reader:
        exported = dict(reader.items())
    assert len(reader.files) > 1
    original = load_file(os.path.join(hf_dir, "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "deepseek_v3"


def test_v2_lite_round_trip_infers_the_model_type(tmp_path, capsys):
    from tests.unit.core.models.hf_tiny import build_hf

    hf = build_hf("v2_lite", seed=1)
    hf.save_pretrained(str(tmp_path / "hf"))
    assert convert_hf_checkpoint.main(["import", "--hf-path", str(tmp_path / "hf"), "--output", str(tmp_path / "ours")]) == 0
    assert convert_hf_checkpoint.main(["export", "--checkpoint", str(tmp_path / "ours"), "--hf-path", str(tmp_path / "out")]) == 0
    assert "deepseek_v2, from the checkpoint" in capsys.readouterr().out
    assert json.load(open(tmp_path / "out" / "config.json"))["model_type"] == "deepseek_v2"
    original, exported = load_file(str(tmp_path / "hf" / "model.safetensors")), load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sorted(exported) == sorted(original) and all(torch.equal(exported[k], original[k]) for k in original)
    # --model-type only overrides, with the usual check of what the type can express.
    argv = ["export", "--checkpoint", str(tmp_path / "ours"), "--hf-path", str(tmp_path / "v3"), "--model-type", "deepseek_v3"]
    assert convert_hf_checkpoint.main(argv) == 1
    assert "sigmoid" in capsys.readouterr().err


def test_import_bf16_and_bad_input(hf_dir, tmp_path, capsys):
    from megatron.training.checkpoint_export import export_full_state_dict

    out = str(tmp_path / "bf16")
    assert convert_hf_checkpoint.main(["import", "--hf-path", hf_dir, "--output", out, "--dtype", "bfloat16"]) == 0
    tensors = export_full_state_dict(out)
    assert tensors["embedding.weight"].dtype == torch.bfloat16
    assert tensors["layers.1.mlp.router.expert_bias"].dtype == torch.float32
    assert convert_hf_checkpoint.main(["import", "--hf-path", str(tmp_path / "nope"), "--output", out]) == 1
    assert "error" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_hf_checkpoint.build_parser().parse_args(["export", "--checkpoint", "a", "--hf-path", "b", "--max-shard-size", "x"])


def test_compare_token_ids_and_json(hf_dir, our_dir, tmp_path, capsys):
    report = str(tmp_path / "r.json")
    argv = ["--hf-path", hf_dir, "--checkpoint", our_dir, "--token-ids", "1 2 3 4 5", "--token-ids", "7 8 9", "--json", report]
    assert compare_with_hf.main(argv) == 0
    out = capsys.readouterr().out
    assert "our model: weights-only training checkpoint (imported), iteration 0" in out
    assert "max_rel_diff" in out and "mean_kl" in out and "top1_agreement" in out
    figures = json.load(open(report))
    assert figures["tokens"] == 8 and figures["failed"] == [] and figures["top1_agreement"] == 1.0
    assert figures["max_rel_diff"] <= 1e-5 and figures["mean_kl"] <= 1e-8
    assert compare_with_hf.main(["--hf-path", hf_dir, "--token-ids", "1 x"]) == 2
    assert compare_with_hf.main(["--hf-path", hf_dir, "--token-ids", "1 640"]) == 2


def test_compare_detects_a_wrong_checkpoint(hf_dir, our_dir, tmp_path, capsys):
    """A damaged model in the single-process format (also accepted, and named as such) fails."""
    from megatron.core.models.deepseek import hf_io
    from megatron.training.checkpoint_export import load_full_model

    model, config = load_full_model(our_dir)
    with torch.no_grad():
        model.layers["1"].mlp.router.expert_bias.zero_()
        model.layers["0"].self_attn.o_proj.weight.mul_(1.5)
    hf_io.save_checkpoint(model, config, str(tmp_path / "broken"))
    assert compare_with_hf.main(["--hf-path", hf_dir, "--checkpoint", str(tmp_path / "broken"), "--token-ids", "1 2 3 4 5 6"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "our model: single-process model checkpoint" in out
    assert compare_with_hf.main(["--hf-path", hf_dir, "--checkpoint", str(tmp_path / "nothing"), "--token-ids", "1"]) == 2


def test_compare_prompts_as_a_script(hf_dir, tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS + ["[UNK]"])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = Whitespace()
    tok_dir = str(tmp_path / "tok")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tok_dir)
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "compare_with_hf.py"), "--hf-path", hf_dir,
           "--prompts", "hello deep world", "mixture of latent experts", "--tokenizer", tok_dir, "--max-rel", "1e-5"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 sequence(s), 7 tokens" in result.stdout
