"""Tokenizer, datasets and per-rank data iterators of a training run.

Every pipeline stage reads the batch (rotary positions and MTP need the token ids), so each rank
builds its data-parallel slice of the loaders: sampler rank = dp rank, resumed from the
consumed-sample counters of a checkpoint.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, Optional, Tuple

from megatron.core.datasets.data_samplers import PretrainingSampler, build_data_loader
from megatron.core.datasets.dataset_builder import build_train_valid_test_datasets
from megatron.core.datasets.dataset_config import GPTDatasetConfig, parse_data_path
from megatron.core.parallel_state import ParallelState
from megatron.training.config import DEFAULT_SPLIT, RunConfig


def build_tokenizer_for_run(run: RunConfig) -> Tuple[Any, RunConfig]:
    """The run's tokenizer, and `run` with the model's vocabulary set to the tokenizer's."""
    from megatron.training.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(run.tokenizer)
    return tokenizer, run.with_tokenizer_vocab(tokenizer.vocab_size)


def gpt_dataset_configs(run: RunConfig, eod_token_id: Optional[int], vocab_size: Optional[int]) -> Dict[str, Any]:
    """{"train" | "valid" | "test": GPTDatasetConfig or None} for the dataset builder.

    --data-path (or --mock-data): one config shared by the three splits, cut by --split.
    --train/valid/test-data-path: one config per split whose whole corpus goes to that split
    (split "1,0,0" / "0,1,0" / "0,0,1"); a missing one gives None.
    """
    d = run.data
    common = dict(
        random_seed=run.training.seed,
        sequence_length=d.seq_length,
        path_to_cache=d.data_cache_path,
        reset_position_ids=d.reset_position_ids,
        reset_attention_mask=d.reset_attention_mask,
        eod_mask_loss=d.eod_mask_loss,
        eod_token_id=eod_token_id,
        vocab_size=vocab_size,
    )
    blends = d.blends()
    if d.mock_data or "--data-path" in blends:
        config = GPTDatasetConfig(
            blend=None if d.mock_data else parse_data_path(list(blends["--data-path"])),
            split=d.split or DEFAULT_SPLIT,
            mock=d.mock_data,
            **common,
        )
        return {"train": config, "valid": config, "test": config}
    out: Dict[str, Any] = {}
    for name, split in (("train", "1,0,0"), ("valid", "0,1,0"), ("test", "0,0,1")):
        paths = blends.get(f"--{name}-data-path")
        out[name] = GPTDatasetConfig(blend=parse_data_path(list(paths)), split=split, **common) if paths else None
    return out


def split_sample_counts(run: RunConfig) -> Tuple[int, int, int]:
    """Megatron's (train, valid, test) sample counts: iters x global batch; eval every interval."""
    t = run.training
    gbs, iters = t.global_batch_size, t.train_iters or 0
    evals = (iters // t.eval_interval + 1) * t.eval_iters if t.eval_interval and t.eval_iters else 0
    return iters * gbs, evals * gbs, t.eval_iters * gbs


def build_datasets(run: RunConfig, tokenizer: Any) -> Dict[str, Any]:
    """{"train", "valid", "test": dataset or None}."""
    configs = gpt_dataset_configs(run, tokenizer.eod, tokenizer.vocab_size)
    counts = dict(zip(("train", "valid", "test"), split_sample_counts(run)))
    if configs["train"] is not None and configs["train"] is configs["valid"] is configs["test"]:
        train, valid, test = build_train_valid_test_datasets(configs["train"], list(counts.values()))
        return {"train": train, "valid": valid, "test": test}
    out: Dict[str, Any] = {}
    for i, name in enumerate(("train", "valid", "test")):
        cfg = configs[name]
        if cfg is None or counts[name] == 0:
            out[name] = None
            continue
        nums = [0, 0, 0]
        nums[i] = counts[name]
        out[name] = build_train_valid_test_datasets(cfg, nums)[i]
    if out["train"] is None and not run.training.skip_train:
        raise ValueError("no training data: give --data-path, --train-data-path or --mock-data")
    return out


class CyclicIterator:
    """Restarts a loader factory when it is exhausted (Megatron's cyclic validation iterator)."""

    def __init__(self, make_loader) -> None:
        self.make_loader = make_loader
        self._it: Optional[Iterator] = None

    def __iter__(self) -> "CyclicIterator":
        return self

    def __next__(self) -> Any:
        if self._it is None:
            self._it = iter(self.make_loader())
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.make_loader())
            return next(self._it)


def build_data_iterators(
    run: RunConfig, state: ParallelState, datasets: Dict[str, Any], consumed: Dict[str, int]
) -> Dict[str, Optional[Iterator]]:
    """{"train", "valid", "test": iterator of micro-batch dicts of tensors, or None}."""
    t = run.training
    dp_rank, dp = state.rank_in("dp"), state.size("dp")

    def loader(name: str, start: int):
        ds = datasets.get(name)
        if ds is None or start >= len(ds):
            return None
        sampler = PretrainingSampler(len(ds), start, t.micro_batch_size, dp_rank, dp)
        return build_data_loader(ds, sampler, run.data.num_workers, seed=t.seed)

    out: Dict[str, Optional[Iterator]] = {"train": None, "valid": None, "test": None}
    train = loader("train", consumed.get("train", 0))
    out["train"] = iter(train) if train is not None else None
    for name in ("valid", "test"):
        if datasets.get(name) is not None and len(datasets[name]) >= t.micro_batch_size * dp:
            start = consumed.get(name, 0) % len(datasets[name])
            first = [True]

            def make(name=name, start=start, first=first):
                s = start if first[0] else 0
                first[0] = False
                return loader(name, s) or loader(name, 0)

            out[name] = CyclicIterator(make)
    return out
