"""The planner against real runs of the entry point: `torchrun pretrain_gpt.py` on 2 CPU ranks.

Communication: torch.distributed's collectives are wrapped and their bytes counted per group
kind (megatron.training.planning.measure); one step = a 2-iteration run minus a 1-iteration run.
Every kind must match the plan exactly, except the dropless all-to-all, whose per-rank rows
follow the router: there the EP group's total must match.
Memory: each rank's resident high-water mark, minus the process baseline measured by the same
layout with a tiny model, within 10% of the planned peak (benchmarks/plan_accuracy.py runs more
layouts and a larger model; see benchmarks/RESULTS.md).
"""

import pytest

from megatron.training.arguments import parse_args
from megatron.training.planning import measure
from megatron.training.planning.plan import plan_for_run

RUN = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--lr", "1e-4", "--train-iters", "2", "--device", "cpu",
       "--num-workers", "0", "--log-interval", "1", "--eval-iters", "0", "--seed", "1"]
TINY = ["--model-preset", "tiny", "--hidden-size", "64", "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "32",
        "--num-layers", "3", "--seq-length", "32", "--micro-batch-size", "2", "--vocab-size", "255"]

COMM_LAYOUTS = {
    # Recompute reruns the forward collectives up to each layer's last saved tensor: not the dense
    # layer's final MLP reduce-scatter, but the MoE layers' (the shared experts follow it).
    "tp2_sp_ep2_allgather_full_recompute": ["--tensor-model-parallel-size", "2", "--sequence-parallel",
                                            "--expert-model-parallel-size", "2", "--moe-token-dispatcher-type",
                                            "allgather", "--recompute-granularity", "full", "--recompute-method",
                                            "uniform", "--recompute-num-layers", "1", "--global-batch-size", "4"],
    "pp2_uneven_mtp": ["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
                       "--global-batch-size", "8"],
    "dp2_ep2_alltoall_distopt": ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall",
                                 "--use-distributed-optimizer", "--global-batch-size", "8"],
}


def _stage_of(rank: int, plan) -> int:
    return rank // (plan.layout.world_size // plan.layout.pp)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(COMM_LAYOUTS))
def test_comm_bytes_equal_instrumented_run(name, tmp_path):
    # No logging iteration in the counted step: the MoE statistics all-reduce of --log-interval
    # iterations is logging, not training traffic, and the plan leaves it out.
    argv = TINY + RUN + COMM_LAYOUTS[name] + ["--log-interval", "1000"]
    plan = plan_for_run(parse_args(argv, 2, check_paths=False), "cpu")
    counted = measure.one_step_comm(2, argv, str(tmp_path))
    predicted = [plan.stages[_stage_of(r, plan)].comm_bytes for r in range(2)]
    kinds = set()
    for rank in range(2):
        kinds |= set(counted[rank]) | set(predicted[rank])
    assert kinds, "no traffic counted"
    for kind in sorted(kinds):
        for rank in range(2):
            got, want = counted[rank].get(kind, {}), predicted[rank].get(kind, {})
            assert set(got) == set(want), (kind, rank, got, want)
            for op in want:
                if kind == "ep" and op == "all_to_all" and plan.model.moe.capacity_factor is None:
                    continue  # data dependent per rank: checked on the group below
                assert got[op] == want[op], (kind, op, rank, got, want)
        if kind == "ep" and "all_to_all" in predicted[0].get("ep", {}):
            total = sum(counted[r]["ep"]["all_to_all"] for r in range(2))
            assert total == sum(predicted[r]["ep"]["all_to_all"] for r in range(2))


# hidden 512, 4 layers (1 dense, 3 MoE of 8 experts) + MTP, seq 512 x micro-batch 3: ~1.0 GiB per rank,
# well above the process's own ~0.35-0.45 GiB (python, torch, oneDNN's kernels; more on a cold start).
MEMORY_MODEL = [
    "--model-preset", "tiny", "--hidden-size", "512", "--num-attention-heads", "8", "--q-lora-rank", "128",
    "--kv-lora-rank", "64", "--qk-head-dim", "64", "--qk-pos-emb-head-dim", "32", "--v-head-dim", "64",
    "--ffn-hidden-size", "2048", "--num-experts", "8", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "512",
    "--moe-shared-expert-intermediate-size", "512", "--num-layers", "4", "--vocab-size", "4095",
    "--seq-length", "512", "--micro-batch-size", "3",
]
BASELINE_MODEL = [  # same layout and sequence (the mock dataset's indices), tiny widths
    "--hidden-size", "64", "--q-lora-rank", "16", "--kv-lora-rank", "16", "--qk-head-dim", "16",
    "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16", "--ffn-hidden-size", "128", "--moe-ffn-hidden-size", "32",
    "--moe-shared-expert-intermediate-size", "32", "--vocab-size", "255",
]


@pytest.mark.slow
def test_peak_memory_within_ten_percent_ep2_allgather():
    layout = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "allgather", "--global-batch-size", "6"]
    big, tiny = MEMORY_MODEL + RUN + layout, MEMORY_MODEL + RUN + layout + BASELINE_MODEL
    plans = [plan_for_run(parse_args(argv, 2, check_paths=False), "cpu") for argv in (big, tiny)]
    measured_big, measured_tiny = measure.measure_peak_rss(2, big), measure.measure_peak_rss(2, tiny)
    for rank in range(2):
        predicted = plans[0].stages[0].memory.peak
        baseline = measured_tiny[rank] - plans[1].stages[0].memory.peak
        measured = measured_big[rank] - baseline
        assert predicted > 2 * baseline  # the model, not the process, dominates
        assert abs(predicted - measured) <= 0.10 * measured, (rank, predicted, measured, baseline)
