"""Parameter counts of the planner against models built on the meta device, and the published sizes."""

import pytest
import torch

from megatron.core.models.deepseek.model import DeepSeekModel
from megatron.core.models.deepseek.presets import PRESETS
from megatron.training.planning.params import model_counts, stage_parameters

# Exact counts of our presets (MTP depths included in `total`, DeepSeek-V3 has one).
EXACT = {
    "deepseek-v3": dict(total=682_636_472_320, total_without_mtp=671_026_404_352,
                        activated_per_token=37_313_703_936, activated_per_token_without_mtp=36_625_603_584),
    "deepseek-v2": dict(total=235_741_434_880, total_without_mtp=235_741_434_880,
                        activated_per_token=20_851_512_320, activated_per_token_without_mtp=20_851_512_320),
    "deepseek-v2-lite": dict(total=15_706_484_224, total_without_mtp=15_706_484_224,
                             activated_per_token=2_451_435_008, activated_per_token_without_mtp=2_451_435_008),
}

# Published sizes in B (DeepSeek-V3 / V2 technical reports, V2-Lite model card) of the main model
# (no MTP module): (total, activated per token). They are rounded: ours are 671.03 / 36.63,
# 235.74 / 20.85 and 15.71 / 2.45, so totals must agree to 0.5% and activated counts to 2.5%.
PUBLISHED = {"deepseek-v3": (671, 37), "deepseek-v2": (236, 21), "deepseek-v2-lite": (15.7, 2.4)}


def _meta_params(config, **kwargs):
    with torch.device("meta"):
        model = DeepSeekModel(config, **kwargs)
    return [
        (name, tuple(p.shape), bool(getattr(p, "is_expert", False)), bool(getattr(p, "shared_embedding", False)))
        for name, p in model.named_parameters()
    ]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_whole_model_parameters_equal_meta_model(name):
    config = PRESETS[name]
    planned = stage_parameters(config, 1, 1, False, (0, config.num_layers), True, True)
    built = _meta_params(config)
    assert [(p.name, p.shape, p.is_expert, p.shared_embedding) for p in planned] == built
    assert model_counts(config).total == sum(torch.Size(shape).numel() for _, shape, _, _ in built)


@pytest.mark.parametrize("name", ["deepseek-v3", "tiny"])
def test_pipeline_stage_parameters_equal_meta_model(name):
    config = PRESETS[name]
    last = config.num_layers
    for layer_range, pre, post in [((0, 2), True, False), ((2, last - 1), False, False), ((last - 1, last), False, True)]:
        planned = stage_parameters(config, 1, 1, False, layer_range, pre, post)
        built = _meta_params(config, layer_range=layer_range, pre_process=pre, post_process=post)
        assert [(p.name, p.shape, p.is_expert, p.shared_embedding) for p in planned] == built


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_counts(name):
    counts = model_counts(PRESETS[name]).as_dict()
    for key, value in EXACT[name].items():
        assert counts[key] == value, key


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_sizes(name):
    total, active = PUBLISHED[name]
    counts = model_counts(PRESETS[name])
    assert abs(counts.total_without_mtp / 1e9 - total) <= 0.005 * total
    assert abs(counts.activated_per_token_without_mtp / 1e9 - active) <= 0.025 * active
    # The embedding lookup is not counted as activated (the published convention): with it the
    # V2-Lite figure would be 2.7B, not 2.4B.
    assert counts.activated_per_token_with_embedding - counts.activated_per_token == counts.embedding


def test_tensor_and_expert_parallel_split():
    config = PRESETS["deepseek-v3"]
    full = stage_parameters(config, 1, 1, False, (0, 4), True, False)
    split = stage_parameters(config, 8, 64, True, (0, 4), True, False)
    by_name = {p.name: p for p in split}
    assert by_name["layers.3.mlp.experts.gate_up_proj"].shape == (4, 4096, 7168)
    assert by_name["layers.0.self_attn.q_b_proj.weight"].shape == (128 // 8 * 192, 1536)
    assert by_name["layers.0.self_attn.q_a_proj.weight"].shape == (1536, 7168)  # replicated
    assert by_name["embedding.weight"].shape == (129280 // 8, 7168)
    assert by_name["layers.3.mlp.router.weight"].sequence_parallel
    assert not by_name["layers.0.self_attn.q_a_proj.weight"].sequence_parallel
    assert sum(p.numel for p in split) < sum(p.numel for p in full) / 8
