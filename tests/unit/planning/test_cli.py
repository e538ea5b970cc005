"""tools/plan_layout.py: flags as pretrain_gpt.py reads them, text and JSON output, search, errors."""

import io
import json

import pytest

from megatron.training.arguments import parse_args
from megatron.training.planning import plan_for_run
from megatron.training.planning.cli import complete_argv, default_world_size, main
from megatron.training.planning.layout import Layout
from megatron.training.planning.search import pipeline_split, strip_layout_flags

V3_DEEPSEEK_LAYOUT = [  # DeepSeek-V3's published training layout (PP16, EP64, ZeRO-1 DP) on 2048 GPUs
    "--model", "v3", "--device-type", "h800", "--num-devices", "2048", "--pipeline-model-parallel-size", "16",
    "--expert-model-parallel-size", "64", "--decoder-first-pipeline-num-layers", "4",
    "--decoder-last-pipeline-num-layers", "1", "--micro-batch-size", "1", "--global-batch-size", "15360",
    "--seq-length", "4096", "--bf16", "--use-distributed-optimizer", "--moe-token-dispatcher-type", "alltoall",
]


def _run(argv):
    out = io.StringIO()
    code = main(argv, out=out)
    return code, out.getvalue()


def test_json_has_the_documented_fields():
    code, text = _run(V3_DEEPSEEK_LAYOUT + ["--json"])
    plan = json.loads(text)
    assert plan["total_params"] == 682_636_472_320 and plan["total_params_without_mtp"] == 671_026_404_352
    assert plan["activated_params_per_token"] == 37_313_703_936
    assert isinstance(plan["fits"], bool) and code == (0 if plan["fits"] else 2)
    stages = plan["stages"]
    assert [s["layers"] for s in stages][:2] == [[0, 4], [4, 8]] and stages[-1]["layers"] == [60, 61]
    for s in stages:
        mem = s["memory_bytes"]
        assert set(mem) >= {"weights", "gradients", "optimizer", "activations", "moe_dispatch", "logits", "peak"}
        assert mem["peak"] >= mem["weights"] + mem["gradients"] + mem["optimizer"]
    # 1F1B: stage s of 16 holds min(16 - s, 120) micro-batches.
    assert [s["in_flight_microbatches"] for s in stages] == list(range(16, 0, -1))
    # bf16 weights, fp32 main grads (--bf16 forces them), optimizer sharded over DP (dense) / EDP (experts).
    first = stages[1]["memory_bytes"]
    assert first["gradients"] == pytest.approx(2 * first["weights"], rel=1e-3)
    assert set(stages[0]["comm_bytes"]) == {"dp", "edp", "ep", "pp", "embedding", "mp"}
    assert plan["layout"]["edp"] == 2 and plan["layout"]["num_microbatches"] == 120


def test_text_report_and_presets_match_pretrain_flags():
    code, text = _run(["--model", "tiny", "--device-type", "cpu", "--device-memory-gb", "64",
                       "--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "256"])
    assert code == 0
    assert "verdict: FITS" in text and "stage layers" in text and "tp " in text
    argv = complete_argv(["--tensor-model-parallel-size", "2", "--sequence-parallel", "--seq-length", "256"], "tiny")
    assert argv[:2] == ["--model-preset", "tiny"] and "--mock-data" in argv
    run = parse_args(argv, default_world_size(argv), check_paths=False)
    assert run.parallel.tensor_model_parallel_size == 2 and run.model.hidden_size == 256


def test_does_not_fit_and_exit_status():
    code, text = _run(["--model", "v2-lite", "--device-type", "gaudi2", "--micro-batch-size", "8"])
    assert code == 2 and "DOES NOT FIT" in text


def test_bad_flags_are_one_line_errors(capsys):
    assert main(["--model", "tiny", "--tensor-model-parallel-size", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1
    assert main(["--model", "tiny", "--device-type", "cpu", "--device-memory-gb", "-1"]) == 1
    with pytest.raises(SystemExit):
        main(["--model", "tiny", "--device-type", "tpu"])


def test_search_ranks_feasible_layouts_and_explains_the_rest():
    code, text = _run(["--model", "tiny", "--device-type", "cpu", "--device-memory-gb", "0.25", "--search", "4",
                       "--seq-length", "512", "--micro-batch-size", "4", "--global-batch-size", "8", "--json"])
    result = json.loads(text)
    feasible, infeasible = result["feasible"], result["infeasible"]
    assert code == 0 and feasible and infeasible
    times = [c["step_time_s"] for c in feasible]
    assert times == sorted(times)
    assert all(c["plan"]["fits"] for c in feasible)
    reasons = " ".join(c["reason"] for c in infeasible)
    assert "out of memory" in reasons  # 0.25 GB is too small for some layouts
    assert "--global-batch-size (8) must be" in reasons  # DP 4 x micro-batch 4: rejected by the parser
    assert all(c["reason"] for c in infeasible)


def test_pipeline_split_and_layout_flags():
    assert pipeline_split(61, 16) == (3, 2)  # most even: 3, 4 x 14, 2 (the last stage also has the head, MTP)
    assert pipeline_split(8, 4) == (None, None)
    assert pipeline_split(3, 4) is None
    argv = ["--tensor-model-parallel-size", "2", "--recompute-modules", "core_attn", "moe", "--bf16",
            "--pipeline-model-parallel-size=4", "--seq-length", "8"]
    assert strip_layout_flags(argv) == ["--bf16", "--seq-length", "8"]


def test_in_flight_microbatches_follow_1f1b():
    lay = Layout(world_size=4, tp=1, pp=4, ep=1, etp=1, dp=1, sequence_parallel=False, stage_layers=(1, 1, 1, 1),
                 dispatcher="alltoall", distributed_optimizer=False, overlap_grad_reduce=False,
                 overlap_param_gather=False, micro_batch_size=1, global_batch_size=2, seq_length=8,
                 params_dtype="float32", grad_reduce_in_fp32=False)
    assert [lay.in_flight(s) for s in range(4)] == [2, 2, 2, 1]  # capped by the 2 micro-batches


def test_plan_for_run_is_usable_by_a_launcher():
    run = parse_args(complete_argv(["--expert-model-parallel-size", "2"], "tiny"), 2, check_paths=False)
    plan = plan_for_run(run, "gaudi3")
    assert plan.layout.ep == 2 and plan.fits
    assert plan.to_dict()["stages"][0]["memory_bytes"]["peak"] == plan.stages[0].memory.peak
