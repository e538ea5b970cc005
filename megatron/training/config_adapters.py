"""The one place where the run configuration meets other packages' dataclasses.

Presets (megatron.core.models.deepseek.presets), the tokenizer package and the dataset config
are imported lazily inside these functions, so `arguments` imports cheaply and a change in one
of those packages is adapted here, in one function each.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence, Tuple

from megatron.core.config import DeepSeekConfig
from megatron.training.config import RunConfig

# The brief's short names for the released models -> the preset module's names.
PRESET_ALIASES: Dict[str, str] = {
    "v3-671b": "deepseek-v3",
    "v2-236b": "deepseek-v2",
    "v2-lite": "deepseek-v2-lite",
}


def preset_names() -> Tuple[str, ...]:
    """Accepted --model-preset values: the preset module's names and our aliases."""
    from megatron.core.models.deepseek.presets import PRESETS

    return tuple(sorted(PRESETS)) + tuple(a for a in PRESET_ALIASES if PRESET_ALIASES[a] in PRESETS)


def load_preset(name: str) -> DeepSeekConfig:
    from megatron.core.models.deepseek.presets import get_preset

    return get_preset(PRESET_ALIASES.get(name, name))


def tokenizer_types() -> Tuple[str, ...]:
    from megatron.training.tokenizer import TOKENIZER_TYPES

    return tuple(TOKENIZER_TYPES)


def make_tokenizer_config(
    tokenizer_type: str,
    tokenizer_model: Optional[str],
    vocab_file: Optional[str],
    merge_file: Optional[str],
    vocab_size: Optional[int],
    extra_vocab_size: int,
    make_vocab_size_divisible_by: int,
    tensor_model_parallel_size: int,
):
    """Our tokenizer flags -> the tokenizer package's TokenizerConfig."""
    from megatron.training.tokenizer import TokenizerConfig

    return TokenizerConfig(
        tokenizer_type=tokenizer_type,
        tokenizer_model=tokenizer_model,
        vocab_file=vocab_file,
        merge_file=merge_file,
        vocab_size=vocab_size,
        extra_vocab_size=extra_vocab_size,
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        tensor_model_parallel_size=tensor_model_parallel_size,
    )


def tokenizer_file_requirements(tokenizer_type: str) -> Tuple[Tuple[str, str, str], ...]:
    """(TokenizerConfig field, flag, "file" | "dir") that the tokenizer's builder will open.

    Mirrors what each tokenizer class requires, so a wrong path fails at parse time instead of
    after the cluster job has started.
    """
    model_dir = (("tokenizer_model", "--tokenizer-model", "dir"),)
    model_file = (("tokenizer_model", "--tokenizer-model", "file"),)
    return {
        "HuggingFaceTokenizer": model_dir,
        "DeepSeekV2Tokenizer": model_dir,
        "GPTSentencePieceTokenizer": model_file,
        "Llama2Tokenizer": model_file,
        "Llama3Tokenizer": model_file,
        "GPT2BPETokenizer": (("vocab_file", "--vocab-file", "file"), ("merge_file", "--merge-file", "file")),
    }.get(tokenizer_type, ())


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    from megatron.training.tokenizer import padded_vocab_size as pad

    return pad(vocab_size, divisible_by, tensor_parallel)


def finalize_vocab_size(run: RunConfig, tokenizer_vocab_size: int) -> RunConfig:
    """`run` with model.vocab_size = the tokenizer's vocabulary padded as Megatron pads it.

    When the vocabulary is already final (it came from a checkpoint's args), a different padded
    size means the tokenizer does not match the checkpoint: that is an error, not a resize.
    """
    tok = run.tokenizer
    padded = padded_vocab_size(tokenizer_vocab_size, tok.make_vocab_size_divisible_by, run.parallel.tensor_model_parallel_size)
    if run.vocab_size_final:
        if padded != run.model.vocab_size:
            raise ValueError(
                f"the tokenizer's vocabulary pads to {padded} but the checkpoint's model has {run.model.vocab_size} rows; "
                "check --tokenizer-type / --tokenizer-model / --make-vocab-size-divisible-by"
            )
        return run
    model = dataclasses.replace(run.model, vocab_size=padded)
    return dataclasses.replace(run, model=model, vocab_size_final=True)


def parse_blend(values: Sequence[str]):
    """`--data-path`-style values -> ((weight, prefix), ...) using the dataset package's parser."""
    from megatron.core.datasets.dataset_config import parse_data_path

    return parse_data_path(list(values))


def check_split(split: str) -> None:
    from megatron.core.datasets.helpers import parse_split

    parse_split(split)


DEFAULT_SPLIT = "969, 30, 1"  # Megatron's legacy value when --data-path comes without --split


def gpt_dataset_configs(run: RunConfig, eod_token_id: Optional[int], vocab_size: Optional[int]) -> Dict[str, object]:
    """{"train" | "valid" | "test": GPTDatasetConfig or None} for the dataset builder.

    --data-path (or --mock-data): one config shared by the three splits, cut by --split.
    --train/valid/test-data-path: one config per split whose whole corpus goes to that split
    (split "1,0,0" / "0,1,0" / "0,0,1"); a missing one gives None.
    """
    from megatron.core.datasets.dataset_config import GPTDatasetConfig

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
    if d.mock_data or d.data_path:
        config = GPTDatasetConfig(
            blend=None if d.mock_data else parse_blend(d.data_path),
            split=d.split or DEFAULT_SPLIT,
            mock=d.mock_data,
            **common,
        )
        return {"train": config, "valid": config, "test": config}
    out: Dict[str, object] = {}
    for name, paths, split in (
        ("train", d.train_data_path, "1,0,0"),
        ("valid", d.valid_data_path, "0,1,0"),
        ("test", d.test_data_path, "0,0,1"),
    ):
        out[name] = GPTDatasetConfig(blend=parse_blend(paths), split=split, **common) if paths else None
    return out
