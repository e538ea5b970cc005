"""The preprocessing pipeline behind `tools/preprocess_data.py`: read, encode, write, finalize.

Output files are byte-identical to Megatron-LM core_v0.12.0's tool for the same input, tokenizer
and flags, including the document order `--partitions` produces there (input lines dealt out
round-robin to P partitions, or in contiguous chunks with `--keep-sequential-samples`, each
partition written in turn). Here no partition copies of the input are written: each record goes
straight to its partition's temporary builder, and the partitions are concatenated at the end.

Nothing half-done looks finished: builders write under temporary names and are renamed only when
complete; on any error they are aborted and temporary files removed, and the error names the file
and line at fault.
"""

from __future__ import annotations

import glob
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, TextIO, Tuple

import numpy as np

from megatron.core.datasets.pair_files import is_stale
from megatron.core.datasets.indexed_dataset import (
    IndexedDataset,
    IndexedDatasetBuilder,
    data_file_path,
    index_file_path,
    optimal_dtype,
)
from megatron.training.data_prep.encode import BatchEncoder, EncodedKey, TokenizeError, configure_thread_pool, has_fast_batch
from megatron.training.data_prep.executor import InProcessExecutor, ProcessExecutor, WorkUnit, fork_available
from megatron.training.data_prep.inputs import BadRecords, InputReader, InputSource, RecordBatch
from megatron.training.data_prep.progress import Progress
from megatron.training.data_prep.sentences import SentenceSplitter, load_sentence_splitter


@dataclass
class PreprocessConfig:
    """The options of `tools/preprocess_data.py` that shape the output (tokenizer aside)."""

    input: str
    output_prefix: str
    json_keys: Sequence[str] = ("text",)
    split_sentences: bool = False
    keep_newlines: bool = False
    append_eod: bool = False
    workers: int = 1
    partitions: int = 1
    keep_sequential_samples: bool = False
    log_interval: int = 1000
    skip_bad_lines: bool = False
    lang: str = "english"
    batch_bytes: int = 1 << 20  # input read per batch; bounds memory together with `workers`
    executor: str = "auto"  # "threads" (Rust tokenizer threads), "processes" (forked workers) or "auto"

    def validate(self) -> None:
        keys = list(self.json_keys)
        if not keys:
            raise ValueError("--json-keys needs at least one key")
        if len(set(keys)) != len(keys):
            raise ValueError(f"--json-keys lists a key twice: {keys}")
        for name in ("workers", "partitions", "log_interval", "batch_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not self.output_prefix:
            raise ValueError("--output-prefix must not be empty")


@dataclass
class PreprocessResult:
    output_prefixes: Dict[str, str]  # key -> `{output_prefix}_{key}_{level}`
    documents: int
    tokens: int
    bytes: int
    seconds: float
    bad_records: int


def output_prefix_for(output_prefix: str, key: str, split_sentences: bool) -> str:
    """Megatron's naming: `{prefix}_{key}_document`, or `_sentence` with --split-sentences."""
    return f"{output_prefix}_{key}_{'sentence' if split_sentences else 'document'}"


def _route(reader: InputReader, partitions: int) -> Iterator[WorkUnit]:
    """Work units in output order per partition: record i of the input (blank lines counted, as
    Megatron counts lines) belongs to partition i mod P."""
    for batch in reader:
        if partitions == 1:
            yield WorkUnit(0, batch)
            continue
        groups: List[List[int]] = [[] for _ in range(partitions)]
        for position, index in enumerate(batch.global_indices):
            groups[index % partitions].append(position)
        for partition, positions in enumerate(groups):
            if positions:
                yield WorkUnit(partition, batch.select(positions))


class _Outputs:
    """The builders of one run: one per key, or one per key and partition with --partitions."""

    def __init__(self, finals: Dict[str, str], dtype: np.dtype, partitions: int) -> None:
        self.finals = finals
        self.dtype = dtype
        self.partitions = partitions
        self.builders: Dict[Tuple[str, int], IndexedDatasetBuilder] = {}
        self.parts: List[str] = []  # finalized partition prefixes, removed at the end
        self.finished: List[str] = []

    def open(self) -> None:
        for final in self.finals.values():
            remove_stale_parts(final)
        tag = f"tmp{os.getpid()}"
        for key, final in self.finals.items():
            for p in range(self.partitions):
                prefix = final if self.partitions == 1 else f"{final}.part{p + 1}-of-{self.partitions}.{tag}"
                self.builders[key, p] = IndexedDatasetBuilder(prefix, dtype=self.dtype)

    def add(self, partition: int, encoded: Dict[str, EncodedKey]) -> None:
        for key, enc in encoded.items():
            self.builders[key, partition].add_raw(memoryview(enc.tokens), enc.lengths, enc.doc_ends)  # no copy

    def finalize(self) -> None:
        if self.partitions == 1:
            for key, final in self.finals.items():
                self.builders[key, 0].finalize()
                self.finished.append(final)
            return
        for (key, p), builder in self.builders.items():
            builder.finalize()
            self.parts.append(builder.prefix)
        for key, final in self.finals.items():
            merged = IndexedDatasetBuilder(final, dtype=self.dtype)
            self.builders[key, -1] = merged
            for p in range(self.partitions):
                merged.add_index(self.builders[key, p].prefix)
            merged.finalize()
            self.finished.append(final)
        self._remove(self.parts)

    @staticmethod
    def _remove(prefixes: List[str]) -> None:
        for prefix in prefixes:
            for path in (index_file_path(prefix), data_file_path(prefix)):
                if os.path.exists(path):
                    os.remove(path)

    def abort(self) -> None:
        """Drop temporaries and partition parts. Keys already committed keep their new, complete
        pair (each pair is replaced whole or not at all; see pair_files)."""
        for builder in self.builders.values():
            builder.abort()
        self._remove(self.parts)


_PART_RE = re.compile(r"\.part\d+-of-\d+\.tmp(\d+)\.(bin|idx)(\.tmp\.\d+)?$")


def remove_stale_parts(final: str) -> List[str]:
    """Remove the `--partitions` parts (`<final>.partI-of-P.tmp<pid>.bin/.idx`, and their own
    temporaries) that a killed run left; parts of a live run are kept."""
    removed = []
    for path in glob.glob(glob.escape(final) + ".part*-of-*.tmp*"):
        match = _PART_RE.search(path)
        if match is not None and is_stale(path, int(match.group(1))):
            try:
                os.remove(path)
                removed.append(path)
            except FileNotFoundError:
                pass
    return removed


def _recover(encoder: BatchEncoder, unit: WorkUnit, error: TokenizeError, bad: BadRecords) -> Tuple[WorkUnit, Dict[str, EncodedKey]]:
    """Recover from a record the tokenizer rejected: name it, or (--skip-bad-lines) drop it and
    encode the rest of the batch here."""
    while True:
        batch: RecordBatch = unit.batch
        bad.report(batch.source, batch.file_line(error.position), str(error))
        keep = [i for i in range(len(batch)) if i != error.position]
        unit = WorkUnit(unit.partition, batch.select(keep))
        try:
            return unit, encoder.encode(unit.batch.values)
        except TokenizeError as again:
            error = again


def preprocess(
    config: PreprocessConfig,
    tokenizer,
    splitter: Optional[SentenceSplitter] = None,
    stream: Optional[TextIO] = None,
    sources: Optional[List[InputSource]] = None,
) -> PreprocessResult:
    """Tokenize `config.input` into one `.bin/.idx` pair per key. Everything that can be checked
    (flags, sentence model, input files and columns) is checked before any file is created.
    `sources` replaces the readers `config.input` names (one unit of a sharded run)."""
    config.validate()
    stream = stream or sys.stderr
    keys = list(config.json_keys)
    if config.keep_newlines and not config.split_sentences:  # Megatron ignores it too; scripts pass it
        print("note: --keep-newlines has no effect without --split-sentences", file=stream)
    if config.split_sentences and splitter is None:
        splitter = load_sentence_splitter(config.lang, config.keep_newlines)
    bad = BadRecords(skip=config.skip_bad_lines)
    workers = config.workers
    use_processes = workers > 1 and fork_available() and (splitter is not None or not has_fast_batch(tokenizer))
    if config.executor != "auto":
        use_processes = config.executor == "processes" and workers > 1 and fork_available()
    batch_bytes = max(64 << 10, config.batch_bytes // workers) if use_processes else config.batch_bytes
    reader = InputReader(config.input, keys, batch_bytes, bad, sources)
    dtype = np.dtype(optimal_dtype(tokenizer.vocab_size))
    partitions = 1 if config.keep_sequential_samples else config.partitions  # contiguous chunks keep input order
    finals = {key: output_prefix_for(config.output_prefix, key, config.split_sentences) for key in keys}
    out_dir = os.path.dirname(os.path.abspath(config.output_prefix))
    os.makedirs(out_dir, exist_ok=True)

    encoder = BatchEncoder(tokenizer, keys, config.append_eod, dtype, splitter)
    if not use_processes:
        configure_thread_pool(workers)
    progress = Progress(config.log_interval, reader.total_bytes, stream)
    outputs = _Outputs(finals, dtype, partitions)

    def recover(unit: WorkUnit, error: TokenizeError) -> Tuple[WorkUnit, Dict[str, EncodedKey]]:
        return _recover(encoder, unit, error, bad)

    executor = ProcessExecutor(encoder, workers, recover) if use_processes else InProcessExecutor(encoder, recover)
    results = executor.map(_route(reader, partitions))
    try:
        outputs.open()
        for unit, encoded in results:
            outputs.add(unit.partition, encoded)
            tokens = sum(e.num_tokens for e in encoded.values())
            progress.update(len(unit.batch), unit.batch.nbytes, tokens, unit.batch.position)
        outputs.finalize()
        for key, prefix in finals.items():  # reopen: a pair that does not validate is an error
            dataset = IndexedDataset(prefix)
            if dataset.num_documents != progress.documents:
                raise RuntimeError(f"{prefix}: wrote {dataset.num_documents} documents, expected {progress.documents}")
            dataset.close()
    except BaseException:
        outputs.abort()
        raise
    finally:
        results.close()  # stops the reader thread
        executor.close()
    progress.final_report()
    print(progress.summary(), file=stream, flush=True)
    if config.skip_bad_lines or bad.count:
        print(f"skipped {bad.count:,} bad records", file=stream)
        for example in bad.examples:
            print(f"  e.g. {example}", file=stream)
    for key, prefix in finals.items():
        print(f"wrote {prefix}.bin / .idx", file=stream)
    return PreprocessResult(finals, progress.documents, progress.tokens, progress.bytes, progress.elapsed, bad.count)
