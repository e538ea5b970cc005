"""HF <-> ours checkpoint conversion: name mapping, streaming import/export, our checkpoint format."""

from __future__ import annotations

import json
import os

import pytest
import torch
from tests.unit.core.models.hf_tiny import build_hf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from megatron.core.models.deepseek import (
    config_from_hf,
    export_hf_checkpoint,
    hf_to_ours,
    load_checkpoint,
    load_hf_checkpoint,
    save_checkpoint,
)
from megatron.core.models.deepseek.hf_conversion import dequantize_fp8, hf_layout, iter_ours_to_hf, meta_shapes
from megatron.core.models.deepseek.hf_io import INDEX_NAME, SafetensorsReader, build_empty_model, config_from_json_dict, config_to_json_dict


def _read_all(directory: str) -> dict:
    with SafetensorsReader(directory) as reader:
        return dict(reader.items())


def _assert_byte_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].view(-1).view(torch.uint8), b[key].view(-1).view(torch.uint8)), key


@pytest.fixture(scope="module")
def v3_dir(tmp_path_factory):
    # num_nextn_predict_layers=1: save_pretrained drops MTP, the import must cope.
    hf = build_hf("v3", num_nextn_predict_layers=1)
    path = str(tmp_path_factory.mktemp("hf_v3"))
    hf.save_pretrained(path)
    return path, hf


@pytest.mark.parametrize("name", ["v3", "v2_lite", "v2_group"])
def test_hf_ours_hf_round_trip_is_byte_exact_and_loads_in_hf(name, tmp_path):
    hf = build_hf(name)
    src, dst = str(tmp_path / "hf"), str(tmp_path / "out")
    hf.save_pretrained(src)
    model, config = load_hf_checkpoint(src)
    export_hf_checkpoint(model, dst, hf.config.model_type, max_shard_bytes=64 * 1024)  # several shards
    assert os.path.exists(os.path.join(dst, INDEX_NAME))
    original = _read_all(src)
    assert any(".mlp.experts.3.up_proj.weight" in k for k in original)  # per-expert keys on disk
    _assert_byte_equal(original, _read_all(dst))
    assert config_from_hf(dst) == config

    reloaded, info = AutoModelForCausalLM.from_pretrained(dst, output_loading_info=True, attn_implementation="eager")
    assert type(reloaded) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, hf.config.vocab_size, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(ids).logits, hf(ids).logits, rtol=0, atol=0)


def test_import_drops_missing_mtp_or_raises(v3_dir):
    path, hf = v3_dir
    with pytest.warns(UserWarning, match="MTP depths"):
        model, config = load_hf_checkpoint(path)
    assert config.mtp.num_layers == 0 and len(model.mtp) == 0
    with pytest.raises(ValueError, match="MTP depths"):
        load_hf_checkpoint(path, missing_mtp="error")


def test_fused_in_memory_keys_import(v3_dir):
    path, hf = v3_dir
    with pytest.warns(UserWarning):
        model, config = load_hf_checkpoint(path)
    state = hf.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_proj" in state  # v5 fused layout
    converted = hf_to_ours(state, config)
    ours = model.state_dict()
    assert sorted(converted) == sorted(ours)
    for key, tensor in converted.items():
        assert torch.equal(tensor, ours[key]), key
    assert torch.count_nonzero(ours["layers.1.mlp.router.expert_bias"]) > 0
    assert ours["layers.1.mlp.router.expert_bias"].dtype == torch.float32


def test_mtp_export_import_with_released_duplicates(tmp_path):
    hf = build_hf("v3", num_nextn_predict_layers=1)
    config = config_from_hf(hf.config)
    assert config.mtp.num_layers == 1
    torch.manual_seed(1)
    from megatron.core.models.deepseek import DeepSeekModel

    ours = DeepSeekModel(config)
    out = str(tmp_path / "hf")
    export_hf_checkpoint(ours, out, "deepseek_v3")
    keys = set(_read_all(out))
    L = config.num_layers
    mtp_keys = {k for k in keys if k.startswith(f"model.layers.{L}.")}
    for k in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight", "mlp.experts.7.down_proj.weight",
              "mlp.gate.e_score_correction_bias", "self_attn.q_a_proj.weight"):
        assert f"model.layers.{L}.{k}" in mtp_keys, k
    assert not any(k.endswith(("embed_tokens.weight", "shared_head.head.weight")) for k in mtp_keys)
    # HF builds no MTP layer: it loads the rest and reports exactly the MTP keys as unexpected
    # (experts under their fused names; with 61 layers, model.layers.61.* is ignored silently).
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    unexpected = set(info["unexpected_keys"])
    assert not info["missing_keys"] and all(k.startswith(f"model.layers.{L}.") for k in unexpected)
    assert {k for k in mtp_keys if ".experts." not in k} <= unexpected

    # DeepSeek's released files also carry embedding / head copies in the MTP layer: skipped.
    shard = os.path.join(out, "model.safetensors")
    tensors = load_file(shard)
    tensors[f"model.layers.{L}.embed_tokens.weight"] = tensors["model.embed_tokens.weight"].clone()
    tensors[f"model.layers.{L}.shared_head.head.weight"] = tensors["lm_head.weight"].clone()
    save_file(tensors, shard, metadata={"format": "pt"})
    loaded, loaded_config = load_hf_checkpoint(out)
    assert loaded_config == config
    reference = ours.state_dict()
    for key, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, reference[key]), key


def test_missing_and_unexpected_keys_are_listed(v3_dir, tmp_path):
    path, _ = v3_dir
    tensors = load_file(os.path.join(path, "model.safetensors"))
    del tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.0.mlp.bogus.weight"] = torch.zeros(2)
    tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    broken = tmp_path / "broken"
    broken.mkdir()
    save_file(tensors, str(broken / "model.safetensors"))
    (broken / "config.json").write_text(open(os.path.join(path, "config.json")).read())
    with pytest.raises(ValueError) as err, pytest.warns(UserWarning):
        load_hf_checkpoint(str(broken))
    msg = str(err.value)
    for text in ("missing (2)", "model.layers.2.mlp.experts.5.up_proj.weight", "model.norm.weight",
                 "unexpected (1)", "model.layers.0.mlp.bogus.weight", "wrong shape (1)", "o_proj.weight"):
        assert text in msg, (text, msg)


def test_layout_covers_each_tensor_exactly_once():
    config = config_from_hf(build_hf("v3", num_nextn_predict_layers=1).config)
    shapes = meta_shapes(config)
    layout, aliases = hf_layout(shapes, config)
    for name, pieces in layout.items():
        cover = torch.zeros(shapes[name], dtype=torch.int32)
        for piece in pieces:
            cover[piece.index] += 1
        assert torch.all(cover == 1), name
    assert aliases["model.layers.2.mlp.experts.gate_up_proj"] == "layers.2.mlp.experts.gate_up_proj"
    assert aliases["model.layers.3.mlp.experts.down_proj"] == "mtp.0.layer.mlp.experts.down_proj"
    hf_keys = [k for k, _ in iter_ours_to_hf({n: torch.empty(s) for n, s in shapes.items()}, config)]
    assert len(hf_keys) == len(set(hf_keys))


def test_our_checkpoint_round_trip_sharded(tmp_path):
    hf = build_hf("v2_lite")
    config = config_from_hf(hf.config)
    assert config_from_json_dict(json.loads(json.dumps(config_to_json_dict(config)))) == config
    from megatron.core.models.deepseek import DeepSeekModel

    torch.manual_seed(0)
    model = DeepSeekModel(config)
    names = save_checkpoint(model, config, str(tmp_path), max_shard_bytes=100_000)
    assert len(names) > 1 and os.path.exists(tmp_path / INDEX_NAME)
    with safe_open(str(tmp_path / names[0]), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded, loaded_config = load_checkpoint(str(tmp_path), dtype=torch.bfloat16)
    assert loaded_config == config
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor.to(torch.bfloat16)), key
    # our checkpoint -> HF directly (streamed from disk) equals the export from the model.
    export_hf_checkpoint(str(tmp_path), str(tmp_path / "a"), "deepseek_v2")
    export_hf_checkpoint(model, str(tmp_path / "b"), "deepseek_v2")
    _assert_byte_equal(_read_all(str(tmp_path / "a")), _read_all(str(tmp_path / "b")))
    # strict names
    save_file({"embedding.weight": torch.zeros(config.vocab_size, config.hidden_size)}, str(tmp_path / "model.safetensors"))
    os.remove(tmp_path / INDEX_NAME)
    for name in names:
        os.remove(tmp_path / name)
    with pytest.raises(ValueError, match="missing"):
        load_checkpoint(str(tmp_path))


def test_empty_model_has_live_rotary_and_zero_counters():
    config = config_from_hf(build_hf("v3").config)
    model = build_empty_model(config, torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16 and model.embedding.weight.device.type == "cpu"
    assert model.layers[1].mlp.router.expert_bias.dtype == torch.float32
    assert torch.count_nonzero(model.layers[1].mlp.router.local_tokens_per_expert) == 0
    assert model.rotary.inv_freq.device.type == "cpu" and torch.isfinite(model.rotary.inv_freq).all()


def test_dequantize_fp8_blocks():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    weight = torch.tensor([[1.0, 2.0, 0.5], [4.0, -1.0, 0.25], [2.0, 2.0, 2.0]]).to(torch.float8_e4m3fn)
    scale = torch.tensor([[2.0, 10.0], [3.0, 0.5]])
    out = dequantize_fp8(weight, scale, (2, 2))
    expected = torch.tensor([[2.0, 4.0, 5.0], [8.0, -2.0, 2.5], [6.0, 6.0, 1.0]])
    torch.testing.assert_close(out, expected)


_MEMORY_CHILD = r"""
import json, sys, torch
from megatron.core.models.deepseek.hf_conversion import load_hf_checkpoint, meta_shapes
from megatron.core.models.deepseek.hf_config import config_from_hf
meta_shapes(config_from_hf(sys.argv[1]))  # torch's one-time meta-device setup (~80 MB) is not the import's cost
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")
base = rss("VmRSS")
model, _ = load_hf_checkpoint(sys.argv[1])
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"peak": rss("VmHWM") - base, "model": size}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset")
def test_import_peak_memory_is_model_plus_one_shard(tmp_path):
    import subprocess
    import sys

    hf = build_hf("v3", hidden_size=256, moe_intermediate_size=256, n_routed_experts=16, vocab_size=4096)
    hf.save_pretrained(str(tmp_path), max_shard_size="8MB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    largest = max(os.path.getsize(tmp_path / f) for f in shards)
    assert len(shards) > 3
    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    # A random init plus a copy would be >= 2 x model; streaming stays near model + one shard.
    assert figures["peak"] < figures["model"] + largest + 12 * 2**20, (figures, largest)
