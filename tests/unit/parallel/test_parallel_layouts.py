"""Every parallel layout we accept computes what one process computes, from a fresh start, through
the production entry point: per-iteration losses, grad norms and final weights of 3 optimizer
steps of a tiny DeepSeek-V3 (MLA, dense + MoE layers with a shared expert, seq aux loss,
expert-bias updates, MTP) within 1e-5 relative, with a vocabulary whose padding differs between
layouts. Spawns gloo ranks on CPU."""

import functools

import pytest

from tests.unit.parallel.layout_harness import Layout, compare, run_layout

TOLERANCE = 1e-5

LAYOUTS = [
    # MoE needs sequence parallelism under TP (each TP rank routes its own tokens), so plain TP2
    # is proven on the dense variant of the model.
    Layout("tp2_dense", 2, ("--tensor-model-parallel-size", "2"), model="dense"),
    Layout("tp2_sp", 2, ("--tensor-model-parallel-size", "2", "--sequence-parallel")),
    # Even split: an MoE layer on each stage, so the reported aux loss sums over both stages.
    Layout("pp2", 2, ("--pipeline-model-parallel-size", "2")),
    Layout("pp2_uneven_first", 2, ("--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1")),
    Layout("ep2_alltoall", 2, ("--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall")),
    Layout("ep2_allgather", 2, ("--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather")),
    Layout("dp2_distopt_overlap", 2, ("--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather")),
    Layout("tp2_sp_ep2", 4, ("--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
                             "--moe-token-dispatcher-type", "alltoall")),
    Layout("pp2_ep2_dp2", 8, ("--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "2",
                              "--use-distributed-optimizer", "--moe-token-dispatcher-type", "alltoall")),
    # Token drop: capacity is per rank's local tokens; one process drops per micro-batch of the
    # same sequences, which is the same token group.
    Layout("ep2_alltoall_drop", 2, ("--expert-model-parallel-size", "2"), model="drop"),
]


@functools.lru_cache(maxsize=None)
def _reference(model: str, workdir: str):
    return run_layout(Layout(f"one_process_{model}", 1, model=model), workdir)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("layouts"))


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_layout_matches_single_process(layout, workdir):
    reference = _reference(layout.model, workdir)
    result = run_layout(layout, workdir)
    assert result.builds == [1] * layout.world, "every rank must build its model with model_builder.build_model_stage"
    worst = compare(reference, result)
    print(f"{layout.name}: {worst}")
    assert worst["loss"] <= TOLERANCE, worst
    assert worst["grad_norm"] <= TOLERANCE, worst
    assert worst["weights"] <= TOLERANCE, worst


@pytest.mark.slow
def test_reference_really_trains_and_drops(workdir):
    """The comparison means something only if the steps change the losses, the drop layout drops
    tokens, and the production builder ran."""
    reference = _reference("moe", workdir)
    assert reference.builds == [1]
    lm = [step["lm loss"] for step in reference.losses]
    assert len(set(round(x, 6) for x in lm)) == len(lm)
    assert {"lm loss", "mtp_1 loss", "seq_aux_loss"} <= set(reference.losses[0])
