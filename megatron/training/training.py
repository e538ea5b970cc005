"""Megatron-style pre-training entry point: `pretrain(argv)` runs a whole job.

One iteration (`train_step`): zero_grad -> forward_backward over this rank's micro-batches
(aux-loss scale 1/num_microbatches) -> mark_step -> finalize_model_grads -> set lr ->
optimizer.step -> update_expert_bias (loads summed over the stage's TP x DP ranks) -> mark_step
-> scheduler step. Logging, evaluation, checkpointing, exit conditions and profiling live around
that step. The parallel-layout tests run this module's `pretrain` on every layout.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import communication as comm
from megatron.core.distributed import finalize_model_grads
from megatron.core.models.deepseek.compile import compiled_autograd
from megatron.core.parallel_state import ParallelState
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.timers import TimedIterator, Timers
from megatron.training.arguments import parse_args
from megatron.training.config import RunConfig, format_run_config
from megatron.training.flops import flops_per_token, measured_matmul_peak, peak_flops
from megatron.training.initialize import (
    destroy_distributed,
    initialize_distributed,
    launcher_env,
    resolve_device,
    set_deterministic_environment,
    set_random_seeds,
)
from megatron.training.lr_scheduler import OptimizerParamScheduler
from megatron.training.model_builder import ModelStage, build_training_stage
from megatron.training.run_summary import RunReport, exit_reason, print_rank, print_rank_0
from megatron.training.training_data import build_data_iterators, build_datasets, build_tokenizer_for_run
from megatron.training.training_log import ExpertLoadLog, TrainingLogger

ForwardStep = Callable[[Any, Any], Tuple[Any, Callable]]


# ---- forward step -----------------------------------------------------------------------------
def gpt_forward_step(data_iterator: Any, model: Any) -> Tuple[Any, Callable]:
    """One micro-batch: every stage reads the batch; the last stage's loss_func reports lm / mtp losses
    (the MoE auxiliary losses of every stage are gathered by the training loop)."""
    batch = next(data_iterator)
    device = next(model.parameters()).device
    tokens = batch["tokens"].to(device)
    labels = batch["labels"].to(device)
    loss_mask = batch["loss_mask"].to(device)
    position_ids = batch["position_ids"].to(device) if "position_ids" in batch else None
    out = model(tokens, labels=labels, position_ids=position_ids)

    def loss_func(output: Any) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        loss = model.loss(output, loss_mask)
        mask = loss_mask.float()
        denom = mask.sum().clamp(min=1.0)
        reported = {"lm loss": ((output.losses.float() * mask).sum() / denom).detach()}
        for depth, losses in enumerate(output.mtp_losses, start=1):
            m = torch.roll(mask, -depth, dims=-1)
            m[..., -depth:] = 0
            reported[f"mtp_{depth} loss"] = ((losses.float() * m).sum() / m.sum().clamp(min=1.0)).detach()
        return loss, reported

    return out, loss_func


# ---- state of a run -----------------------------------------------------------------------------
class _Run:
    """Everything the loop needs, built once by `setup`."""

    def __init__(self, run: RunConfig, state: ParallelState, device: Any, stage: ModelStage,
                 scheduler: OptimizerParamScheduler, iterators: Dict[str, Any], logger: TrainingLogger,
                 iteration: int, consumed: Dict[str, int], forward_step: ForwardStep, rank: int) -> None:
        self.run, self.state, self.device, self.stage = run, state, device, stage
        self.scheduler, self.iterators, self.logger = scheduler, iterators, logger
        self.iteration, self.consumed, self.forward_step, self.rank = iteration, consumed, forward_step, rank
        self.schedule = get_forward_backward_func(run.parallel.pipeline_model_parallel_size)
        self.torch_device = next(stage.model.parameters()).device  # where this rank's collectives run
        self.aux_reported: List[Dict[str, torch.Tensor]] = []  # this stage's MoE aux losses per micro-batch
        lg = run.logging
        self.timers = Timers(enabled=lg.log_timers_to_tensorboard or lg.timing_log_level > 0,
                             synchronize=device.synchronize)
        stage.model.set_timers(self.timers)
        self.backward_context = None
        if run.device.use_torch_compiled_autograd:
            self.backward_context = lambda: compiled_autograd(stage.ddp)
        self.sigterm = False
        self.start_time = time.time()
        self.loss_history: List[Dict[str, Any]] = []  # one entry per iteration run by this process
        self.report = RunReport(run, self.torch_device, iteration)
        self.expert_loads = ExpertLoadLog(run, stage.model, state.rank_in("tp") == 0 and state.rank_in("dp") == 0,
                                          self.torch_device, logger, iteration)

    @property
    def model(self) -> Any:
        return self.stage.model

    def tensor_shape(self) -> Tuple[int, int, int]:
        seq = self.run.data.seq_length
        if self.run.parallel.sequence_parallel:
            seq //= self.run.parallel.tensor_model_parallel_size
        return (self.run.training.micro_batch_size, seq, self.run.model.hidden_size)

    def _forward_step_recording_aux(self, data_iterator: Any, model: Any) -> Tuple[Any, Callable]:
        """The forward step, plus this stage's MoE auxiliary losses of the micro-batch (every stage)."""
        out = self.forward_step(data_iterator, model)
        self.aux_reported.append(self.model.moe_aux_loss_values())
        return out

    def run_schedule(self, iterator: Any, forward_only: bool) -> List[Dict[str, torch.Tensor]]:
        self.aux_reported = []
        return self.schedule(
            forward_step_func=self._forward_step_recording_aux, data_iterator=iterator, model=self.stage.ddp,
            num_microbatches=self.run.num_microbatches, tensor_shape=self.tensor_shape(),
            dtype=next(self.model.parameters()).dtype, parallel_state=self.state, forward_only=forward_only,
            device=self.device, grad_sync_context=None if forward_only else self.stage.ddp.no_sync,
            aux_loss_scale_func=None if forward_only else self.model.set_moe_aux_loss_scale,
            timers=self.timers,
            backward_context=self.backward_context if not forward_only else None,
        )

    def _aux_names(self) -> List[str]:
        m, moe = self.run.model, self.run.model.moe
        if not any(m.is_moe_layer(i) for i in range(m.num_layers + m.mtp.num_layers)):
            return []
        names = {"seq_aux_loss": ["seq_aux_loss"], "aux_loss": ["aux_loss"]}.get(moe.load_balancing_type, [])
        return names + (["z_loss"] if moe.z_loss_coeff else [])

    def reduce_losses(self, reported: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Micro-batch means averaged over the data-parallel ranks, on the last stage ({} elsewhere).

        The MoE auxiliary losses are summed over the layers of every pipeline stage (one all-reduce
        over the "pp" group, which every rank joins) before the average."""
        aux_names = self._aux_names()
        aux = torch.zeros(len(aux_names), dtype=torch.float32, device=self.torch_device)
        if aux_names and self.aux_reported:
            per_micro = [torch.stack([d[n].float() if n in d else aux.new_zeros(()) for n in aux_names])
                         for d in self.aux_reported]
            aux = torch.stack(per_micro).mean(0)
        if aux_names and self.state.size("pp") > 1:
            comm.all_reduce(aux, group=self.state.group("pp"))
        if not self.state.is_last_stage or not reported:
            return {}
        names = list(reported[0])
        stacked = torch.stack([torch.stack([r[n].float() for n in names]) for r in reported]).mean(0)
        stacked = torch.cat([stacked, aux.to(stacked.device)])
        if self.state.size("dp") > 1:
            comm.all_reduce(stacked, group=self.state.group("dp"))
            stacked /= self.state.size("dp")
        return dict(zip(names + aux_names, stacked.tolist()))


# ---- one iteration -------------------------------------------------------------------------------
def train_step(r: _Run) -> Tuple[Dict[str, float], bool, Optional[float], Optional[int]]:
    """(losses, update applied, grad norm, num zeros)."""
    t = r.run.training
    opt = r.stage.optimizer
    opt.zero_grad()
    if r.iteration + 1 in t.iterations_to_skip:  # Megatron: read the batch, skip the update
        for _ in range(r.run.num_microbatches):
            next(r.iterators["train"])
        return {}, False, None, None
    reported = r.run_schedule(TimedIterator(r.iterators["train"], r.timers), forward_only=False)
    r.device.mark_step()
    finalize_model_grads([r.stage.ddp], r.state)
    r.stage.ddp.finish_param_sync()  # a bucket no forward used this step is still in flight
    opt.set_lr(r.scheduler.get_lr())
    with r.timers("optimizer"):
        ok, grad_norm, num_zeros = opt.step()
    losses = r.reduce_losses(reported)
    if ok:
        r.model.update_expert_bias()
    r.device.mark_step()
    return losses, ok, grad_norm, num_zeros


def _nan_in(losses: Dict[str, float]) -> bool:
    return any(not math.isfinite(v) for v in losses.values())


@torch.no_grad()
def evaluate(r: _Run, split: str = "valid") -> Dict[str, float]:
    """Mean losses over --eval-iters forward-only iterations of `split`."""
    iterator = r.iterators.get(split)
    if iterator is None or r.run.training.eval_iters <= 0:
        return {}
    r.model.eval()
    sums: Dict[str, float] = {}
    for _ in range(r.run.training.eval_iters):
        losses = r.reduce_losses(r.run_schedule(iterator, forward_only=True))
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v
        r.consumed[split] = r.consumed.get(split, 0) + r.run.training.global_batch_size
        r.device.mark_step()
    r.model.train()
    return {k: v / r.run.training.eval_iters for k, v in sums.items() if "aux" not in k}


# ---- checkpoints ---------------------------------------------------------------------------------
def _checkpointing():
    try:
        from megatron.training import checkpointing
    except ImportError as exc:
        raise RuntimeError(f"--save/--load need megatron.training.checkpointing, which failed to import: {exc}") from exc
    return checkpointing


def save(r: _Run) -> None:
    c = r.run.checkpoint
    if not c.save:
        return
    print_rank_0(f"saving checkpoint at iteration {r.iteration} to {c.save}")
    r.stage.ddp.finish_param_sync()  # parameters gathered in the background must be complete
    _checkpointing().save_checkpoint(
        c.save, r.iteration, r.stage.chunks, None if c.no_save_optim else r.stage.optimizer,
        r.scheduler.state_dict(), r.run, r.state, dict(r.consumed), rng=not c.no_save_rng,
        allow_tracker_rewind=c.ckpt_allow_tracker_rewind,
    )
    r.report.after_save(r.iteration)


def _load(run: RunConfig, state: ParallelState, stage: ModelStage, scheduler: OptimizerParamScheduler
          ) -> Tuple[int, Dict[str, int]]:
    c = run.checkpoint
    if not c.load:
        return 0, {"train": 0, "valid": 0, "test": 0}
    loaded = _checkpointing().load_checkpoint(
        c.load, stage.chunks, stage.optimizer, run, state, load_optim=not c.no_load_optim,
        load_rng=not c.no_load_rng, finetune=c.finetune, fallback_to_previous=c.ckpt_fallback_to_previous,
    )
    if loaded is None:
        _missing_checkpoint(run)
        return 0, {"train": 0, "valid": 0, "test": 0}
    if c.finetune:
        return 0, {"train": 0, "valid": 0, "test": 0}
    sched = loaded.get("scheduler_state") or {}
    if sched and not run.scheduler.override_opt_param_scheduler:
        scheduler.load_state_dict(sched, use_checkpoint_values=run.scheduler.use_checkpoint_opt_param_scheduler)
    consumed = {"train": 0, "valid": 0, "test": 0, **dict(loaded.get("consumed_samples") or {})}
    print_rank_0(f"loaded checkpoint from {c.load} at iteration {loaded['iteration']}")
    return int(loaded["iteration"]), consumed


def _with_checkpoint_args(run: RunConfig) -> RunConfig:
    """--use-checkpoint-args: the model (and, if asked, tokenizer / parallel) flags of --load's checkpoint."""
    c = run.checkpoint
    if not (c.use_checkpoint_args and c.load):
        return run
    from megatron.training.arguments import apply_checkpoint_args

    saved = _checkpointing().checkpoint_args(c.load, run)
    if saved is None:
        _missing_checkpoint(run)
        print_rank_0(f"--use-checkpoint-args: no checkpoint arguments in {c.load}; using the command line")
        return run
    return apply_checkpoint_args(run, saved)


def _missing_checkpoint(run: RunConfig) -> None:
    """--load holds no checkpoint: an error, unless the run restarts from its own --save directory
    (nothing there yet on the first start) or --allow-no-checkpoint asks to start fresh."""
    c = run.checkpoint
    if c.exit_on_missing_checkpoint or not (c.allow_no_checkpoint or c.resumes_own_saves):
        raise ValueError(
            f"--load {c.load}: no checkpoint there (no latest_checkpointed_iteration.txt and no iter_* directory); "
            "check the path, or pass --allow-no-checkpoint to train from scratch"
        )
    print_rank_0(f"no checkpoint found in {c.load}: training from scratch")


# ---- setup / loop --------------------------------------------------------------------------------
def _peak(run: RunConfig, device: Any) -> float:
    peak = peak_flops(device.kind, device.device_name(), run.model.params_dtype)
    if peak is not None:
        return peak
    return measured_matmul_peak(getattr(torch, run.model.params_dtype), run.model.kernels.use_onednn_linear)


_held_locks: List[Any] = []  # save-directory locks of this process, released when pretrain ends


def setup(run: RunConfig, rank: int, local_rank: int, forward_step: ForwardStep) -> _Run:
    device = resolve_device(run.device.device, run.device.lazy_mode)
    device.set_deterministic(run.training.deterministic_mode)
    moe = run.model.moe
    if device.lazy_mode and (moe.capacity_factor is None or not moe.pad_to_capacity):
        print_rank_0("note: HPU lazy mode with dropless or unpadded MoE: expert batch sizes follow the routing, so graphs "
                     "recompile as it changes; --moe-expert-capacity-factor 1.0 --moe-pad-expert-input-to-capacity "
                     "--moe-token-dispatcher-type alltoall keeps shapes static")
    if run.model.kernels.mark_step_per_layer and not device.lazy_mode:
        print_rank_0(f"note: --mark-step-per-layer has no effect here: it ends HPU lazy-mode graphs ({device.kind}, lazy mode off)")
    state = ParallelState.build(run.parallel)
    if run.checkpoint.save:  # one job per save directory, taken before anything is written there
        _held_locks.append(_checkpointing().acquire_save_lock(run.checkpoint.save, force=run.checkpoint.ckpt_force_unlock))
    set_random_seeds(run.training.seed, state.rank_in("pp"), device)
    tokenizer, run = build_tokenizer_for_run(run)
    print_rank_0(format_run_config(run))
    stage = build_training_stage(run, state, device, local_rank)
    if run.optimizer.optimizer == "fusedadamw" and not stage.optimizer.uses_fused_adamw:
        print_rank_0(f"note: --optimizer fusedadamw: no fused AdamW kernel on {device.kind}; this repository's AdamW "
                     "runs instead (the same update)")
    scheduler = OptimizerParamScheduler.from_run_config(stage.optimizer, run)
    iteration, consumed = _load(run, state, stage, scheduler)
    iterators = build_data_iterators(run, state, build_datasets(run, tokenizer), consumed)
    logging_rank = state.is_last_stage and state.rank_in("tp") == 0 and state.rank_in("dp") == 0
    logger = TrainingLogger(run, logging_rank, flops_per_token(run.model, run.data.seq_length)["train"],
                            _peak(run, device), run.distributed.world_size)
    r = _Run(run, state, device, stage, scheduler, iterators, logger, iteration, consumed, forward_step, rank)
    r.report.print_startup(stage.model, state, device.kind)
    return r




def _exit_reason(r: _Run) -> Optional[str]:
    return exit_reason(r.run.training, r.iteration, r.sigterm, r.start_time, r.torch_device)


class _Profiler:
    """torch.profiler between --profile-step-start and --profile-step-end on --profile-ranks.

    --profile (or --use-pytorch-profiler) and --profile-type pt: CPU and device activity;
    pt-full adds shapes, memory and Python stacks; hltv (Gaudi's trace viewer format) records the
    HPU activity through the same profiler and needs an HPU. The trace is written under
    --tensorboard-dir (else ./profile), and where it went is printed.
    """

    def __init__(self, r: _Run) -> None:
        lg = r.run.logging
        kind = lg.profile_type or ("pt" if lg.profile or lg.use_pytorch_profiler else None)
        self.enabled = kind is not None and r.rank in lg.profile_ranks
        self.kind = kind
        self.start, self.end, self.prof = lg.profile_step_start, lg.profile_step_end, None
        self.out_dir = os.path.join(lg.tensorboard_dir or "profile", "traces")
        self.device_kind = r.device.kind
        if kind == "hltv" and self.device_kind != "hpu":
            raise ValueError(f"--profile-type hltv records Gaudi HPU activity, but this run is on {self.device_kind}; "
                             "use --profile-type pt")

    def before(self, iteration: int) -> None:
        if self.enabled and iteration == self.start and self.prof is None:
            acts = [torch.profiler.ProfilerActivity.CPU]
            device_activity = {"cuda": "CUDA", "hpu": "HPU"}.get(self.device_kind)
            if device_activity and hasattr(torch.profiler.ProfilerActivity, device_activity):
                acts.append(getattr(torch.profiler.ProfilerActivity, device_activity))
            full = self.kind == "pt-full"
            self.prof = torch.profiler.profile(
                activities=acts, record_shapes=full, profile_memory=full, with_stack=full,
                on_trace_ready=torch.profiler.tensorboard_trace_handler(self.out_dir))
            self.prof.start()

    def after(self, iteration: int) -> None:
        if self.prof is not None and iteration >= self.end:
            self.prof.stop()
            self.prof = None
            print_rank(f"profiler trace of iterations {self.start}-{self.end} written to {os.path.abspath(self.out_dir)}")


def train(r: _Run) -> str:
    """The training loop; returns why it stopped."""
    t, lg = r.run.training, r.run.logging
    profiler = _Profiler(r)
    last_norm: Optional[float] = None
    last_zeros: Optional[int] = None
    r.model.train()
    while r.iteration < (t.train_iters or 0):
        profiler.before(r.iteration + 1)
        t0 = time.perf_counter()
        losses, ok, grad_norm, num_zeros = train_step(r)
        step_time = time.perf_counter() - t0
        nan = _nan_in(losses) or (grad_norm is not None and not math.isfinite(grad_norm))
        if not ok and grad_norm is not None:  # a real non-finite gradient, not --iterations-to-skip
            if t.check_for_nan_in_loss_and_grad and not t.skip_nan_loss:
                raise RuntimeError(
                    f"iteration {r.iteration + 1}: NaN/Inf in the loss or gradients (grad norm {grad_norm}); "
                    "pass --skip-nan-loss to skip such iterations"
                )
        r.iteration += 1
        r.consumed["train"] += t.global_batch_size
        if ok:
            r.scheduler.step(1)
            last_norm, last_zeros = grad_norm, num_zeros
        r.logger.add(losses, skipped=not ok, nan=nan, timers={"train-step": step_time, **r.timers.read()})
        r.loss_history.append({"iteration": r.iteration, "skipped": not ok, **losses})
        profiler.after(r.iteration)
        moe_stats = r.expert_loads.collect(r.iteration)  # every rank: one collective when a window ends
        if r.iteration % lg.log_interval == 0:
            extra = dict(moe_stats)
            if lg.log_memory_to_tensorboard:
                extra.update({f"memory/{k}": float(v) for k, v in r.device.memory_stats().items()})
            r.logger.log(r.iteration, r.consumed["train"], r.stage.optimizer.get_lr(), last_norm, last_zeros, extra)
        if t.eval_interval and r.iteration % t.eval_interval == 0 and r.iterators.get("valid") is not None:
            r.logger.log_validation(r.iteration, evaluate(r, "valid"))
        c = r.run.checkpoint
        if c.save and c.save_interval and r.iteration % c.save_interval == 0:
            save(r)
            saved_at = r.iteration
        else:
            saved_at = None
        reason = _exit_reason(r)
        if reason is not None:
            if saved_at != r.iteration:
                save(r)
            print_rank_0(f"exiting at iteration {r.iteration}: {reason}")
            return reason
    if r.iteration and (not r.run.checkpoint.save_interval or r.iteration % r.run.checkpoint.save_interval):
        save(r)
    return "train iters"


def _final_evaluations(r: _Run, reason: str) -> Dict[str, Dict[str, float]]:
    """Validation and test losses after training (or instead of it, with --skip-train). The
    validation set is not evaluated again when the loop just did so at this iteration."""
    t = r.run.training
    out: Dict[str, Dict[str, float]] = {}
    if reason not in ("train iters", "skip train") or t.eval_iters <= 0:
        return out
    just_validated = reason == "train iters" and r.iteration > 0 and r.iteration % t.eval_interval == 0
    if r.iterators.get("valid") is not None and not just_validated:
        out["valid"] = evaluate(r, "valid")
        label = "validation (end of training)" if reason == "train iters" else "validation"
        r.logger.log_validation(r.iteration, out["valid"], label)
    if r.iterators.get("test") is not None:
        out["test"] = evaluate(r, "test")
        r.logger.log_validation(r.iteration, out["test"], "test")
    return out


def pretrain(argv: Optional[List[str]] = None, forward_step_func: Optional[ForwardStep] = None) -> Dict[str, Any]:
    """Parse flags, initialise, train, evaluate; returns a summary (iteration, exit reason, log history).

    Run under torchrun / mpirun (the launcher's variables say the world), or inside a process
    group that already exists (tests): then that group is used and left for its owner to destroy.
    """
    owns_group = not dist.is_initialized()
    env_world = launcher_env()[1] if owns_group else dist.get_world_size()
    run = parse_args(argv, env_world)
    run = _with_checkpoint_args(run)
    if run.training.deterministic_mode:
        set_deterministic_environment()
    rank, world, local_rank = initialize_distributed(
        run.device.device, run.distributed.distributed_timeout_minutes, run.device.lazy_mode)
    if world != run.distributed.world_size:
        raise ValueError(f"parsed for world size {run.distributed.world_size} but the process group has {world}")
    r: Optional[_Run] = None
    previous = None
    try:
        r = setup(run, rank, local_rank, forward_step_func or gpt_forward_step)
        if run.training.exit_signal_handler:
            def _handler(signum, frame):
                r.sigterm = True
            previous = signal.signal(signal.SIGTERM, _handler)
        reason = "skip train"
        if not run.training.skip_train:
            reason = train(r)
        r.stage.ddp.finish_param_sync()
        evaluations = _final_evaluations(r, reason)
        r.report.print_end_summary(r.iteration, r.consumed, r.logger, reason)
        return {"iteration": r.iteration, "exit_reason": reason, "history": r.logger.history,
                "skipped": r.logger.skipped_total, "nan": r.logger.nan_total, "consumed": dict(r.consumed),
                "losses": list(r.loss_history), "evaluations": evaluations}
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if r is not None:
            r.logger.close()
            # The gradient hooks close a reference cycle through autograd (parameter -> hook ->
            # DDP -> parameter) that Python's collector cannot see: without removing them the
            # model, and the process groups it holds, would live until interpreter shutdown.
            r.stage.ddp.remove_hooks()
            r = None
        while _held_locks:
            _checkpointing().release_save_lock(_held_locks.pop())
        if owns_group:
            destroy_distributed()
