"""Corpus preprocessing into Megatron `.bin/.idx` datasets (`tools/preprocess_data.py`,
`tools/merge_datasets.py`). Import-light on purpose: no torch, so it runs on machines without
the training stack."""

from megatron.training.data_prep.inputs import BadRecords, InputError, InputReader, open_inputs
from megatron.training.data_prep.pipeline import PreprocessConfig, PreprocessResult, output_prefix_for, preprocess
from megatron.training.data_prep.sentences import SentenceSplitterUnavailable, load_sentence_splitter

__all__ = [
    "BadRecords",
    "InputError",
    "InputReader",
    "PreprocessConfig",
    "PreprocessResult",
    "SentenceSplitterUnavailable",
    "load_sentence_splitter",
    "open_inputs",
    "output_prefix_for",
    "preprocess",
]
