"""Megatron flags -> RunConfig: the Gaudi DeepSeek example's command line, presets, every
validation error, and the JSON-safe flat form stored in checkpoints."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import List

import pytest

from megatron.core.models.deepseek.presets import PRESET_ALIASES, PRESETS
from megatron.core.pipeline_parallel import stage_layer_ranges
from megatron.training.arguments import COMPAT_FLAGS, ArgumentsError, apply_checkpoint_args, build_parser, parse_args
from megatron.training.arguments_parser import moe_layer_freq_type
from megatron.training.config import from_flat_dict, to_flat_dict
from megatron.training.training_data import gpt_dataset_configs

TINY = ["--model-preset", "tiny", "--seq-length", "128", "--micro-batch-size", "1", "--train-iters", "10",
        "--lr", "1e-3", "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000"]


def gaudi_argv(tmp: Path, dispatcher: str = "allgather", token_drop: bool = False) -> List[str]:
    """examples/deepseek/pretrain_deepseek.sh's command at its defaults (V3 sizes), HL_DP=HL_TP=HL_PP=HL_EP=2,
    HL_FISRT_PP_STAGE_LAYERS=30, HL_CKP_ACT=1, HL_VERIFY_CKPT=1, profiling on, mock data instead of --data-path."""
    (tmp / "tok").mkdir(exist_ok=True)
    argv = f"""
    --transformer-impl transformer_engine --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2
    --decoder-first-pipeline-num-layers 30 --distributed-backend nccl --seq-length 4096 --num-layers 61
    --hidden-size 7168 --num-attention-heads 128 --num-query-groups 128 --ffn-hidden-size 18432
    --position-embedding-type rope --rotary-base 10000 --max-position-embeddings 4096 --normalization RMSNorm
    --swiglu --untie-embeddings-and-output-weights --attention-dropout 0.0 --hidden-dropout 0.0
    --num-experts 256 --moe-router-topk 8 --expert-model-parallel-size 2 --moe-router-load-balancing-type seq_aux_loss
    --moe-router-bias-update-rate 0.001 --moe-router-score-function sigmoid --moe-router-topk-scaling-factor 2.5
    --moe-router-num-groups 8 --moe-router-group-topk 4 --moe-router-enable-expert-bias --moe-aux-loss-coeff 1e-4
    --moe-token-dispatcher-type {dispatcher} --moe-ffn-hidden-size 2048 --moe-shared-expert-intermediate-size 2048
    --moe-layer-freq ([0]*3+[1]*58)
    --multi-latent-attention --q-lora-rank 1536 --kv-lora-rank 512 --qk-head-dim 128 --qk-layernorm
    --qk-pos-emb-head-dim 64 --v-head-dim 128
    --weight-decay 1e-1 --clip-grad 1.0 --adam-beta1 0.9 --adam-beta2 0.95 --adam-eps 1e-8 --lr 2.2e-4
    --lr-decay-style cosine --lr-warmup-iters 2000 --min-lr 2.2e-5 --use-fused-sdpa-with-recompute 1
    --use-fused-sdpa 1 --use-fused-rmsnorm 1 --use-fast-softmax 1 --micro-batch-size 1 --global-batch-size 3072
    --train-iters 500000 --lr-decay-iters 320000 --log-interval 10 --log-throughput --disable-bias-linear
    --optimizer fusedadamw --no-gradient-accumulation-fusion --no-masked-softmax-fusion --use-mcore-models --bf16
    --exit-interval 0 --tensorboard-dir {tmp}/tb --log-validation-ppl-to-tensorboard --log-timers-to-tensorboard
    --load {tmp}/ckpt --use-checkpoint-args --eval-interval 1000 --eval-iters 10 --mock-data
    --init-method-std 6e-3 --num-workers 2 --no-rope-fusion --kv-channels 128 --use-torch-compile=0
    --use-torch-compiled-autograd=0 --distributed-timeout-minutes 60 --moe-grouped-gemm --overlap-grad-reduce
    --sequence-parallel --recompute-granularity=full --recompute-method uniform --recompute-num-layers 1
    --use-distributed-optimizer --save-distrib-optimizer-method parallel_multi_node
    --load-distrib-optimizer-method serial_per_node --kill-switch-file {tmp}/kill --profile-type pt
    --profile-step-start 3 --profile-step-end 4 --save {tmp}/ckpt --save-interval 2000 --ckpt-format torch_dist
    --verify-checkpoint --verify-checkpoint-model-type DEEPSEEK --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model {tmp}/tok --data-cache-path {tmp}/cache
    """.split()
    if token_drop:  # HL_TOKEN_DROP=1
        argv += "--moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity --moe-token-drop-policy probs".split()
    return argv


def test_gaudi_example_command_parses_to_deepseek_v3(tmp_path):
    run = parse_args(gaudi_argv(tmp_path), world_size=8)
    m = run.model
    assert (m.hidden_size, m.ffn_hidden_size, m.num_layers, m.first_k_dense, m.moe_layer_freq) == (7168, 18432, 61, 3, 1)
    assert (m.mla.num_heads, m.mla.q_lora_rank, m.mla.kv_lora_rank) == (128, 1536, 512)
    assert (m.mla.qk_nope_head_dim, m.mla.qk_rope_head_dim, m.mla.v_head_dim) == (128, 64, 128)
    moe = m.moe
    assert (moe.num_experts, moe.topk, moe.ffn_hidden_size, moe.num_shared_experts) == (256, 8, 2048, 1)
    assert (moe.score_function, moe.num_groups, moe.group_topk, moe.routed_scaling_factor) == ("sigmoid", 8, 4, 2.5)
    assert moe.enable_expert_bias and moe.bias_update_rate == 1e-3 and moe.norm_topk_prob
    assert (moe.load_balancing_type, moe.aux_loss_coeff, moe.capacity_factor) == ("seq_aux_loss", 1e-4, None)
    assert m.rope.scaling_type is None and m.rope.theta == 10000.0 and m.rope.interleave
    assert m.max_position_embeddings == 4096 and m.mtp.num_layers == 0
    assert m.params_dtype == "bfloat16" and m.init_method_std == 6e-3 and not m.tie_word_embeddings
    assert m.kernels.use_fused_sdpa and m.kernels.use_fused_sdpa_with_recompute and m.kernels.use_fast_softmax
    assert m.kernels.use_fused_rmsnorm and m.kernels.use_grouped_gemm
    p, d = run.parallel, run.distributed
    assert (p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size) == (2, 2, 2)
    assert p.sequence_parallel and d.data_parallel_size == 2 and run.stage_layers == (30, 31)
    assert d.moe_token_dispatcher_type == "allgather" and d.distributed_timeout_minutes == 60
    t = run.training
    assert (t.micro_batch_size, t.global_batch_size, run.num_microbatches) == (1, 3072, 1536)
    assert (t.train_iters, t.exit_interval, t.eval_interval, t.eval_iters) == (500000, None, 1000, 10)
    assert (t.recompute.granularity, t.recompute.method, t.recompute.num_layers) == ("full", "uniform", 1)
    assert t.kill_switch_file == f"{tmp_path}/kill" and t.bf16
    s, o = run.scheduler, run.optimizer
    assert (s.lr, s.min_lr, s.lr_decay_style, s.lr_warmup_iters, s.lr_decay_iters) == (2.2e-4, 2.2e-5, "cosine", 2000, 320000)
    assert (o.optimizer, o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay, o.clip_grad) == ("fusedadamw", 0.9, 0.95, 1e-8, 0.1, 1.0)
    assert o.use_distributed_optimizer and o.overlap_grad_reduce
    c = run.checkpoint
    assert (c.save, c.load, c.save_interval, c.ckpt_format) == (f"{tmp_path}/ckpt", f"{tmp_path}/ckpt", 2000, "torch_dist")
    assert c.use_checkpoint_args and c.verify_checkpoint
    assert any(n.startswith("--save-distrib-optimizer-method has no effect here") for n in run.notes)
    lg = run.logging
    assert (lg.log_interval, lg.profile_type, lg.profile_step_start, lg.profile_step_end) == (10, "pt", 3, 4)
    assert lg.log_throughput and lg.log_timers_to_tensorboard and lg.log_validation_ppl_to_tensorboard
    assert run.tokenizer.tokenizer_type == "HuggingFaceTokenizer" and run.tokenizer.tensor_model_parallel_size == 2
    assert run.data.mock_data and run.data.seq_length == 4096 and run.data.data_cache_path == f"{tmp_path}/cache"
    assert run.device.lazy_mode is None and not run.device.use_torch_compile and not run.vocab_size_final


def test_yarn_and_mtp_flags(tmp_path):
    extra = ("--mtp-num-layers 1 --mtp-loss-scaling-factor 0.3 --rope-type yarn --rotary-scaling-factor 40 --mscale 1.0 "
             "--mscale-all-dim 1.0 --beta-fast 32 --beta-slow 1 --original-max-position-embeddings 4096 "
             "--max-position-embeddings 163840 --seq-length 8192").split()
    m = parse_args(gaudi_argv(tmp_path) + extra, world_size=8).model
    assert (m.mtp.num_layers, m.mtp.loss_scaling_factor) == (1, 0.3)
    r = m.rope
    assert (r.scaling_type, r.factor, r.mscale, r.mscale_all_dim, r.original_max_position_embeddings) == ("yarn", 40.0, 1.0, 1.0, 4096)
    assert m.max_position_embeddings == 163840
    assert parse_args(gaudi_argv(tmp_path) + ["--no-rotary-interleaved"], world_size=8).model.rope.interleave is False


def test_gaudi_token_drop_needs_alltoall(tmp_path):
    with pytest.raises(ValueError, match="needs --moe-token-dispatcher-type alltoall"):
        parse_args(gaudi_argv(tmp_path, token_drop=True), world_size=8)
    moe = parse_args(gaudi_argv(tmp_path, "alltoall", token_drop=True), world_size=8).model.moe
    assert (moe.capacity_factor, moe.pad_to_capacity, moe.drop_policy) == (1.0, True, "probs")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_map_back_to_themselves(name):
    run = parse_args(["--model-preset", name] + TINY[2:], world_size=1)
    preset = PRESETS[name]
    assert run.model == dataclasses.replace(preset, kernels=run.model.kernels, vocab_size=run.model.vocab_size,
                                            make_vocab_size_divisible_by=run.model.make_vocab_size_divisible_by)


def test_preset_aliases():
    for alias, name in PRESET_ALIASES.items():
        assert parse_args(["--model-preset", alias] + TINY[2:], world_size=1).model.moe == PRESETS[name].moe


def test_tiny_preset_with_overrides():
    argv = TINY + "--num-layers 6 --hidden-size 128 --moe-router-topk 1 --mtp-num-layers 0 --moe-aux-loss-coeff 0.01 --bf16".split()
    m = parse_args(argv, world_size=1).model
    assert (m.num_layers, m.hidden_size, m.moe.topk, m.mtp.num_layers, m.moe.aux_loss_coeff) == (6, 128, 1, 0, 0.01)
    assert (m.first_k_dense, m.moe.num_groups, m.moe.num_experts, m.mla.num_heads) == (1, 2, 8, 8)  # from the preset
    assert m.params_dtype == "bfloat16"


def err(argv: List[str], world_size: int = 1, exc=ValueError) -> str:
    with pytest.raises(exc) as info:
        parse_args(argv, world_size=world_size)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("extra, world, expected", [
    ("--tensor-model-parallel-size 2", 3, "not divisible by tensor"),
    ("--num-experts 6 --expert-model-parallel-size 4", 4, r"--num-experts \(6\) must be divisible by --expert-model-parallel-size \(4\)"),
    ("--tensor-model-parallel-size 3", 3, r"--num-attention-heads \(8\) must be divisible by --tensor-model-parallel-size \(3\)"),
    ("--pipeline-model-parallel-size 3", 3, r"--num-layers \(4\) is not divisible by --pipeline-model-parallel-size"),
    ("--num-layers 10 --pipeline-model-parallel-size 4 --decoder-first-pipeline-num-layers 3 --decoder-last-pipeline-num-layers 2",
     4, "not divisible by the 2 other stage"),
    ("--decoder-first-pipeline-num-layers 2", 1, "needs --pipeline-model-parallel-size > 1"),
    ("--micro-batch-size 2 --global-batch-size 6", 2, r"--global-batch-size \(6\) must be a positive multiple"),
    ("--moe-expert-capacity-factor 1.0", 1, "capacity is applied where the alltoall dispatcher"),
    ("--moe-pad-expert-input-to-capacity --moe-token-dispatcher-type alltoall", 1, "needs --moe-expert-capacity-factor"),
    ("--moe-shared-expert-overlap", 1, "--moe-shared-expert-overlap"),
    ("--seq-length 8192", 1, r"--seq-length \(8192\) exceeds --max-position-embeddings \(4096\)"),
    ("--rope-type yarn --rotary-scaling-factor 2 --original-max-position-embeddings 1024 --max-position-embeddings 8192 "
     "--seq-length 4096", 1, "exceeds what YaRN covers"),
    ("--rotary-scaling-factor 4 --rope-type rope", 1, "needs --rope-type yarn"),
    ("--fp16", 1, "bf16"),
    ("--lr-warmup-iters 10", 1, "warmup .* must be shorter than the decay"),
    ("--lr-warmup-iters 2 --lr-warmup-fraction 0.1", 1, "one of --lr-warmup-fraction"),
    ("--min-lr 1e-2", 1, r"--min-lr \(0.01\) must not exceed --lr"),
    ("--lr-decay-style WSD", 1, "needs --lr-wsd-decay-iters"),
    ("--train-iters 10 --train-samples 100", 1, "not both"),
    ("--lr-decay-samples 100", 1, "--lr-decay-samples needs --train-samples"),
    ("--save /tmp/x", 1, "--save needs --save-interval"),
    ("--use-checkpoint-args", 1, "--use-checkpoint-args needs --load"),
    ("--finetune", 1, "--finetune needs --load"),
    ("--ckpt-format torch", 1, "only torch_dist"),
    ("--moe-router-score-function softmax --no-moe", 1, "unrecognized arguments: --no-moe"),
    ("--moe-router-score-function softmax --moe-router-enable-expert-bias=0", 1, "ignored explicit argument"),
    ("--moe-router-score-function softmax", 1, "needs --moe-router-pre-softmax"),
    ("--moe-router-score-function softmax --moe-router-pre-softmax --moe-router-enable-expert-bias", 1, "needs --moe-router-score-function sigmoid"),
    ("--moe-router-num-groups 4 --moe-router-group-topk 8", 1, r"--moe-router-group-topk \(8\) must be in \[1, --moe-router-num-groups = 4\]"),
    ("--recompute-granularity selective --recompute-modules mlp", 1, "argument --recompute-modules: invalid choice: 'mlp'"),
    ("--tensor-model-parallel-size 2", 2, "MoE layers with --tensor-model-parallel-size > 1 need --sequence-parallel"),
    ("--override-explicit-args-from-checkpoint", 1, "applies to --use-checkpoint-args"),
    ("--allow-no-checkpoint", 1, "--allow-no-checkpoint needs --load"),
    ("--moe-router-num-groups 4 --moe-router-group-topk", 1, "expected one argument"),
    ("--moe-layer-freq [1,0,1,1]", 1, "--moe-layer-freq pattern has 4 entries but --num-layers is 4|must be k dense"),
    ("--moe-layer-freq ([0]*2+[1]*3)", 1, "pattern has 5 entries but --num-layers is 4"),
    ("--moe-layer-freq __import__('os')", 1, "argument --moe-layer-freq"),
    ("--moe-shared-expert-intermediate-size 100", 1, "must be a multiple of --moe-ffn-hidden-size"),
    ("--normalization LayerNorm", 1, "RMSNorm"),
    ("--position-embedding-type learned_absolute", 1, "uses rope"),
    ("--hidden-dropout 0.1", 1, "no dropout"),
    ("--recompute-granularity full", 1, "needs --recompute-method"),
    ("--recompute-granularity selective --recompute-method uniform", 1, "full only"),
    ("--use-lazy-mode 1 --use-torch-compile 1", 1, "lazy mode and --use-torch-compile"),
    ("--use-lazy-mode 1 --device cpu", 1, "HPU only"),
    ("--use-torch-compiled-autograd 1", 1, "needs --use-torch-compile"),
    ("--use-fused-sdpa maybe", 1, "expected 1/0 or true/false"),
    ("--context-parallel-size 2", 1, "context parallelism"),
    ("--overlap-param-gather", 1, "needs --use-distributed-optimizer"),
    ("--profile-type pt --profile-ranks 3", 2, r"--profile-ranks \[3\]"),
    ("--tokenizer-type GPT2BPETokenizer", 1, "needs --vocab-file"),
])
def test_validation_errors_name_the_flag(extra, world, expected):
    message = err(TINY + extra.split(), world)
    assert re.search(expected, message), message


def test_moe_layer_freq_list_must_be_dense_then_moe():
    assert "must be k dense" in err(TINY + ["--moe-layer-freq", "[1,0,1,1]"])
    m = parse_args(TINY + ["--moe-layer-freq", "([0]*2+[1]*2)"], world_size=1).model
    assert (m.first_k_dense, m.moe_layer_freq) == (2, 1)
    m = parse_args(TINY + ["--moe-layer-freq", "2"], world_size=1).model
    assert (m.first_k_dense, m.moe_layer_freq) == (0, 2)


def test_moe_layer_freq_type_is_safe():
    assert moe_layer_freq_type("([0]*3+[1]*58)") == [0] * 3 + [1] * 58
    assert moe_layer_freq_type("4") == 4
    for bad in ("[0]*10**9", "[0]*100000000", "[2]*3", "[[0]]", "open('x')", "[0]+1"):
        with pytest.raises(Exception):
            moe_layer_freq_type(bad)


def test_missing_required_and_data(tmp_path):
    assert "--seq-length is required" in err([a for a in TINY if a not in ("--seq-length", "128")])
    assert "--num-experts is required" in err("--num-layers 2 --hidden-size 64 --num-attention-heads 2 --seq-length 8".split())
    no_data = [a for a in TINY if a != "--mock-data"]
    assert "no training data" in err(no_data)
    assert "use one data source" in err(TINY + ["--data-path", f"{tmp_path}/x"])
    assert f"{tmp_path}/x.bin" in err(no_data + ["--data-path", "0.5", f"{tmp_path}/x", "0.5", f"{tmp_path}/y"])
    for ext in ("bin", "idx"):
        (tmp_path / f"x.{ext}").write_bytes(b"")
    run = parse_args(no_data + ["--data-path", f"{tmp_path}/x", "--split", "98,2,0"], world_size=1)
    assert run.data.data_path == (f"{tmp_path}/x",) and run.data.split == "98,2,0"
    assert "--split" in err(no_data + ["--data-path", f"{tmp_path}/x", "--split", "a,b"])


def test_tokenizer_files_are_checked(tmp_path):
    base = [a for a in TINY if a not in ("--tokenizer-type", "NullTokenizer")]
    assert "needs --vocab-size" in err([a for a in TINY if a not in ("--vocab-size", "1000")])
    assert "must be an existing directory" in err(base + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", f"{tmp_path}/none"])
    assert "must be an existing file" in err(base + ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", str(tmp_path)])
    assert "--tokenizer-type is required" in err(base)
    run = parse_args(base + ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", f"{tmp_path}/none"],
                     world_size=1, check_paths=False)
    assert run.tokenizer.tokenizer_model == f"{tmp_path}/none"


def test_save_and_load_dirs(tmp_path):
    (tmp_path / "file").write_text("")
    assert "is not a directory" in err(TINY + ["--save", f"{tmp_path}/file", "--save-interval", "5"])
    assert "is not a directory" in err(TINY + ["--load", f"{tmp_path}/file"])
    assert "does not exist" in err(TINY + ["--load", f"{tmp_path}/none", "--exit-on-missing-checkpoint"])
    run = parse_args(TINY + ["--save", f"{tmp_path}/new/ckpt", "--save-interval", "5", "--load", f"{tmp_path}/none"], world_size=1)
    assert run.checkpoint.save == f"{tmp_path}/new/ckpt"


def test_unknown_flag_is_argparse_error():
    with pytest.raises(ArgumentsError, match="unrecognized arguments: --not-a-flag"):
        parse_args(TINY + ["--not-a-flag"], world_size=1)
    with pytest.raises(ArgumentsError, match="unrecognized arguments"):  # no prefix matching
        parse_args(TINY + ["--num-lay", "2"], world_size=1)


def test_resolution_rules():
    run = parse_args(TINY + ["--sequence-parallel"], world_size=1)
    assert not run.parallel.sequence_parallel and any("--sequence-parallel" in n for n in run.notes)
    run = parse_args([a for a in TINY if a not in ("--train-iters", "10")] + "--train-samples 100 --global-batch-size 4 --lr-warmup-samples 8 --lr-decay-samples 80".split(), world_size=1)
    assert (run.training.train_iters, run.scheduler.lr_warmup_iters, run.scheduler.lr_decay_iters) == (25, 2, 20)
    run = parse_args(TINY + ["--lr-warmup-fraction", "0.2", "--exit-interval", "5", "--moe-layer-recompute"], world_size=1)
    assert run.scheduler.lr_warmup_iters == 2 and run.training.exit_interval == 5
    assert (run.training.recompute.granularity, run.training.recompute.modules) == ("selective", ("moe",))
    run = parse_args(TINY + "--recompute-granularity selective --recompute-modules moe".split(), world_size=1)
    assert (run.training.recompute.granularity, run.training.recompute.modules) == ("selective", ("moe",))
    # HL_CKP_ACT=1 together with HL_MOE_LAYER_RECOMPUTE=1: the later --recompute-granularity wins, as in argparse
    clash = "--recompute-granularity=full --recompute-method uniform --recompute-num-layers 1 --recompute-granularity selective"
    assert "full only" in err(TINY + clash.split() + ["--recompute-modules", "moe"])
    run = parse_args(TINY + ["--moe-aux-loss-coeff", "0"], world_size=1)
    assert any("no effect" in n for n in run.notes)


def test_parser_uses_megatron_defaults():
    v = vars(build_parser().parse_args([]))
    expected = dict(lr_decay_style="linear", adam_beta2=0.999, moe_router_topk=2, kv_lora_rank=32, ckpt_format="torch_dist",
                    eval_iters=100, log_interval=100, norm_epsilon=1e-5, distributed_timeout_minutes=10,
                    make_vocab_size_divisible_by=128, rotary_base=10000, moe_aux_loss_coeff=0.0, clip_grad=1.0,
                    moe_router_bias_update_rate=1e-3, weight_decay=0.01, seed=1234, num_workers=2, save_interval=None,
                    moe_token_dispatcher_type="allgather", use_fused_sdpa=True, check_for_nan_in_loss_and_grad=True)
    assert {k: v[k] for k in expected} == expected


def test_compat_flags_are_accepted():
    argv = list(TINY)
    for flag, kwargs, _ in COMPAT_FLAGS:
        argv.append(flag)
        if kwargs.get("action") != "store_true":
            argv.append(str(kwargs["choices"][0]) if "choices" in kwargs else "1")
    assert parse_args(argv, world_size=1).model == parse_args(TINY, world_size=1).model


def test_flat_dict_round_trip_is_json_safe(tmp_path):
    run = parse_args(gaudi_argv(tmp_path) + ["--mtp-num-layers", "1"], world_size=8)
    flat = json.loads(json.dumps(to_flat_dict(run)))
    assert all(isinstance(v, (type(None), bool, int, float, str, list)) for v in flat.values())
    assert flat["model.moe.num_experts"] == 256 and flat["parallel.tensor_model_parallel_size"] == 2
    assert from_flat_dict(flat) == run
    with pytest.raises(ValueError, match="unknown run-config keys: model.bogus"):
        from_flat_dict({**flat, "model.bogus": 1})
    with pytest.raises(ValueError, match="model.hidden_size: expected int"):
        from_flat_dict({**flat, "model.hidden_size": {"__class__": "os.system"}})
    with pytest.raises(ValueError, match="unsupported run-config format"):
        from_flat_dict({**flat, "__format__": "pickle"})
    older = {k: v for k, v in flat.items() if k != "logging.moe_token_distribution_logging_interval"}
    assert from_flat_dict(older).logging.moe_token_distribution_logging_interval == 50


def test_apply_checkpoint_args_takes_shapes_from_the_checkpoint(tmp_path):
    saved = to_flat_dict(parse_args(TINY + ["--hidden-size", "128", "--moe-aux-loss-coeff", "0.5"], world_size=1))
    run = parse_args(TINY + ["--moe-aux-loss-coeff", "0.01", "--load", str(tmp_path), "--use-checkpoint-args"], world_size=1)
    merged = apply_checkpoint_args(run, saved)
    assert merged.model.hidden_size == 128 and merged.model.moe.aux_loss_coeff == 0.01 and merged.vocab_size_final
    assert any(n.startswith("model.hidden_size: 256 -> 128") for n in merged.notes)
    # Explicit flags that disagree with the checkpoint are an error naming each difference ...
    explicit = TINY + "--hidden-size 64 --num-layers 6 --load x --use-checkpoint-args".split()
    message = str(pytest.raises(ValueError, apply_checkpoint_args, parse_args(explicit, world_size=1), saved).value)
    assert "--hidden-size 64 (checkpoint: 128)" in message and "--num-layers 6 (checkpoint: 4)" in message
    assert "--override-explicit-args-from-checkpoint" in message and "\n" not in message
    # ... unless the user lets the checkpoint win (each difference is then a note).
    won = apply_checkpoint_args(parse_args(explicit + ["--override-explicit-args-from-checkpoint"], world_size=1), saved)
    assert won.model.hidden_size == 128 and any(n.startswith("model.num_layers: 6 -> 4") for n in won.notes)
    bad = {**saved, "model.moe.num_experts": 6, "model.moe.num_groups": 1, "model.moe.group_topk": 1}
    run2 = parse_args(TINY + ["--expert-model-parallel-size", "4", "--load", str(tmp_path)], world_size=4)
    with pytest.raises(ValueError, match=r"--num-experts \(6\) must be divisible by --expert-model-parallel-size \(4\)"):
        apply_checkpoint_args(run2, bad)


def test_vocab_and_dataset_configs():
    run = parse_args(TINY + ["--tensor-model-parallel-size", "2", "--sequence-parallel"], world_size=2)
    final = run.with_tokenizer_vocab(1001)  # NullTokenizer(1000): 1000 ids + eod
    assert final.model.vocab_size == 1001 and final.vocab_size_final
    assert final.model.padded_vocab_size(2) == 1024  # the model pads to a multiple of 128 x TP = 256
    with pytest.raises(ValueError, match="the tokenizer has 1300 ids but the checkpoint's model has 1001"):
        final.with_tokenizer_vocab(1300)
    configs = gpt_dataset_configs(run, eod_token_id=1000, vocab_size=1001)
    assert configs["train"] is configs["valid"] and configs["train"].mock and configs["train"].sequence_length == 128


def test_stage_layer_ranges_and_map():
    assert stage_layer_ranges(61, 4, 16) == [(0, 16), (16, 31), (31, 46), (46, 61)]
    assert stage_layer_ranges(61, 2, None, 31) == [(0, 30), (30, 61)]
    with pytest.raises(ValueError, match="with no stage to hold them"):
        stage_layer_ranges(61, 2, 30, 30)
    run = parse_args(TINY + "--pipeline-model-parallel-size 2 --decoder-first-pipeline-num-layers 1".split(), world_size=2)
    assert run.stage_layers == (1, 3)
    assert run.stage_map().splitlines() == [
        "stage 0: embedding + layers 0 (1: dense 0)",
        "stage 1: layers 1-3 (3: MoE 1-3) + output head + MTP (1 layer)",
    ]


def test_compat_flags_say_they_have_no_effect():
    notes = parse_args(TINY + ["--use-flash-attn", "--no-masked-softmax-fusion"], world_size=1).notes
    assert "--no-masked-softmax-fusion has no effect here: no such fusion here" in notes
    assert any(n.startswith("--use-flash-attn has no effect here") for n in notes)
    assert not any("--no-persist-layer-norm" in n for n in notes)  # only the flags given
    assert parse_args(TINY, world_size=1).model.kernels.use_fused_rope
    assert not parse_args(TINY + ["--no-rope-fusion"], world_size=1).model.kernels.use_fused_rope


def test_onednn_linear_flag_reaches_the_model_config() -> None:
    assert parse_args(TINY, world_size=1).model.kernels.use_onednn_linear
    assert not parse_args(TINY + ["--use-onednn-linear", "false"], world_size=1).model.kernels.use_onednn_linear


def test_core_configs_from_a_run():
    """The training adapters fill core's DDP and optimizer configs from the run's sections."""
    from megatron.training.model_builder import ddp_config, optimizer_config

    argv = TINY + "--weight-decay 0.05 --clip-grad 2.0 --adam-beta2 0.95 --use-distributed-optimizer --overlap-grad-reduce --bf16 --min-lr 1e-4 --log-num-zeros-in-grad".split()
    run = parse_args(argv, world_size=1)
    opt = optimizer_config(run)
    assert (opt.lr, opt.min_lr, opt.weight_decay, opt.clip_grad, opt.adam_beta2) == (1e-3, 1e-4, 0.05, 2.0, 0.95)
    assert opt.bf16 and opt.use_distributed_optimizer and opt.log_num_zeros_in_grad
    ddp = ddp_config(run)
    assert ddp.use_distributed_optimizer and ddp.overlap_grad_reduce and ddp.grad_reduce_in_fp32  # fp32 reduction with bf16
    assert not ddp_config(parse_args(TINY, world_size=1)).grad_reduce_in_fp32


def test_data_args_files_give_the_same_blend(tmp_path):
    for name in ("a", "b"):
        for ext in ("bin", "idx"):
            (tmp_path / f"{name}.{ext}").write_bytes(b"")
    no_data = [a for a in TINY if a != "--mock-data"]
    cli = parse_args(no_data + ["--data-path", "0.3", f"{tmp_path}/a", "0.7", f"{tmp_path}/b"], world_size=1)
    (tmp_path / "blend.txt").write_text(f"0.3 {tmp_path}/a\n0.7 {tmp_path}/b\n")
    from_file = parse_args(no_data + ["--data-args-path", str(tmp_path / "blend.txt")], world_size=1)
    assert from_file.data.data_args_path and not from_file.data.data_path
    blend = lambda run: gpt_dataset_configs(run, eod_token_id=1000, vocab_size=1001)["train"].blend  # noqa: E731
    assert blend(from_file) == blend(cli)
    (tmp_path / "splits.json").write_text(f'{{"train": ["{tmp_path}/a"], "valid": ["{tmp_path}/b"]}}')
    run = parse_args(no_data + ["--per-split-data-args-path", str(tmp_path / "splits.json")], world_size=1)
    configs = gpt_dataset_configs(run, eod_token_id=1000, vocab_size=1001)
    assert [prefix for _, prefix in configs["train"].blend] == [f"{tmp_path}/a"]
    assert [prefix for _, prefix in configs["valid"].blend] == [f"{tmp_path}/b"] and configs["test"] is None
    assert "use one data source" in err(no_data + ["--data-args-path", str(tmp_path / "blend.txt"), "--data-path", f"{tmp_path}/a"])
    assert "--data-args-path" in err(no_data + ["--data-args-path", str(tmp_path / "missing.txt")])
    (tmp_path / "bad.txt").write_text(f"0.5 {tmp_path}/missing\n")
    assert f"{tmp_path}/missing.bin" in err(no_data + ["--data-args-path", str(tmp_path / "bad.txt")])


def test_wide_expert_parallelism_defaults_to_alltoall():
    run = parse_args(TINY + ["--expert-model-parallel-size", "4"], world_size=4)
    assert run.distributed.moe_token_dispatcher_type == "alltoall"
    assert any("all-to-all token dispatcher is used" in n for n in run.notes)
    chosen = parse_args(TINY + ["--expert-model-parallel-size", "4", "--moe-token-dispatcher-type", "allgather"], world_size=4)
    assert chosen.distributed.moe_token_dispatcher_type == "allgather"
    assert parse_args(TINY + ["--expert-model-parallel-size", "2"], world_size=2).distributed.moe_token_dispatcher_type == "allgather"
