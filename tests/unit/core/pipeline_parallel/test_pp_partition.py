"""Layer split over pipeline stages (--decoder-first/last-pipeline-num-layers) and the stage map."""

import pytest

from megatron.core.pipeline_parallel import describe_stages, format_stage_map, stage_layer_ranges


def test_even_split_and_single_stage():
    assert stage_layer_ranges(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert stage_layer_ranges(5, 1) == [(0, 5)]
    assert stage_layer_ranges(3, 3) == [(0, 1), (1, 2), (2, 3)]


def test_uneven_first_and_last_stage():
    assert stage_layer_ranges(7, 4, first_stage_layers=1) == [(0, 1), (1, 3), (3, 5), (5, 7)]
    assert stage_layer_ranges(7, 4, last_stage_layers=1) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert stage_layer_ranges(10, 4, first_stage_layers=2, last_stage_layers=2) == [(0, 2), (2, 5), (5, 8), (8, 10)]
    # PP2 with one pinned stage: the other takes the rest
    assert stage_layer_ranges(5, 2, first_stage_layers=1) == [(0, 1), (1, 5)]
    assert stage_layer_ranges(5, 2, first_stage_layers=3, last_stage_layers=2) == [(0, 3), (3, 5)]
    assert stage_layer_ranges(8, 4, first_stage_layers=3, last_stage_layers=3) == [(0, 3), (3, 4), (4, 5), (5, 8)]
    # DeepSeek-V3: 61 layers over PP16, first stage 1 layer (it also holds the embedding)
    ranges = stage_layer_ranges(61, 16, first_stage_layers=1)
    assert [e - s for s, e in ranges] == [1] + [4] * 15 and ranges[-1][1] == 61
    for ranges in (stage_layer_ranges(7, 4, first_stage_layers=1), stage_layer_ranges(61, 16, 1)):
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])) and ranges[0][0] == 0


@pytest.mark.parametrize(
    "args,kwargs,match",
    [
        ((7, 4), {}, r"--num-layers \(7\) is not divisible by --pipeline-model-parallel-size \(4\).*--decoder-first-pipeline-num-layers"),
        ((3, 4), {}, "a stage would get 0 layers"),
        ((8, 0), {}, "--pipeline-model-parallel-size must be >= 1"),
        ((0, 1), {}, "--num-layers must be >= 1"),
        ((8, 1), {"first_stage_layers": 2}, "--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size > 1"),
        ((8, 1), {"last_stage_layers": 2}, "--decoder-last-pipeline-num-layers needs --pipeline-model-parallel-size > 1"),
        ((8, 4), {"first_stage_layers": 0}, "--decoder-first-pipeline-num-layers must be >= 1"),
        ((8, 4), {"last_stage_layers": -1}, "--decoder-last-pipeline-num-layers must be >= 1"),
        ((8, 4), {"first_stage_layers": 5, "last_stage_layers": 4}, r"exceeds --num-layers \(8\)"),
        ((8, 4), {"first_stage_layers": 3}, r"--decoder-first-pipeline-num-layers leave 5 .* not divisible by the 3 other"),
        ((8, 4), {"first_stage_layers": 4, "last_stage_layers": 3}, "--decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers leave 1 .*0 layers"),
        ((8, 3), {"first_stage_layers": 4, "last_stage_layers": 4}, "0 layers"),
        ((8, 2), {"first_stage_layers": 3, "last_stage_layers": 3}, "must add up to --num-layers"),
        ((4, 2), {"first_stage_layers": 4}, "0 layers"),
    ],
)
def test_impossible_splits_name_the_flags(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        stage_layer_ranges(*args, **kwargs)


def test_stage_map_shows_dense_moe_embedding_head_and_mtp():
    ranges = stage_layer_ranges(7, 3, first_stage_layers=1)
    infos = describe_stages(ranges, is_moe_layer=lambda i: i >= 2, mtp_num_layers=1)
    assert [i.num_layers for i in infos] == [1, 3, 3]
    assert infos[0].dense_layers == (0,) and infos[0].moe_layers == ()
    assert infos[1].dense_layers == (1,) and infos[1].moe_layers == (2, 3)
    assert [i.has_embedding for i in infos] == [True, False, False]
    assert [i.has_output_head for i in infos] == [False, False, True]
    assert [i.mtp_num_layers for i in infos] == [0, 0, 1]
    text = format_stage_map(ranges, is_moe_layer=lambda i: i >= 2, mtp_num_layers=1)
    assert text.splitlines() == [
        "stage 0: embedding + layers 0 (1: dense 0)",
        "stage 1: layers 1-3 (3: dense 1, MoE 2-3)",
        "stage 2: layers 4-6 (3: MoE 4-6) + output head + MTP (1 layer)",
    ]
    # No predicate: all dense; PP1: everything on one stage
    assert format_stage_map([(0, 2)]) == "stage 0: embedding + layers 0-1 (2: dense 0-1) + output head"
    with pytest.raises(ValueError, match="empty"):
        describe_stages([])
