"""Streaming readers for preprocessing inputs.

Why this exists: Megatron's tool hands one JSON line at a time to a process pool, and users feed it
corpora far larger than RAM (user-needs row 27: 250 GB of RAM exhausted by a 43 GB JSONL). These
readers hand out bounded batches (about `batch_bytes` of input each) from JSON lines (optionally
gzip-compressed), Parquet, Arrow files, `datasets.save_to_disk` folders and anything else the
`datasets` library streams from local disk, and never hold a whole input in memory.

Every record keeps its line (or row) number, so a bad record is reported as `file:line`, and its
position among all lines of all inputs, which decides its partition with `--partitions`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import re
from typing import Iterator, List, Optional, Sequence

from megatron.training.data_prep.columnar import ArrowSource, DatasetsSource, ParquetSource
from megatron.training.data_prep.records import (  # noqa: F401  (re-exported)
    BadRecords,
    InputError,
    InputSource,
    RecordBatch,
    Value,
    value_problem,
)

JSON_LINE_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson", ".ndjson.gz")
DATASETS_BUILDERS = {".csv": "csv", ".tsv": "csv", ".txt": "text", ".csv.gz": "csv", ".txt.gz": "text"}
_BOM = b"\xef\xbb\xbf"


class JsonLinesSource(InputSource):
    """JSON lines, one object per line, optionally gzip-compressed (Megatron's input format)."""

    def __init__(self, path: str, byte_range: Optional[tuple[int, int]] = None) -> None:
        super().__init__(path)
        self._raw = None
        # With a byte range [start, end) (sharded preprocessing), the records are the lines that
        # start inside it; line numbers in messages stay those of the whole file.
        self.byte_range = byte_range
        self._first_line_start = 0
        self._line_base: Optional[int] = None
        if byte_range is not None:
            if path.endswith(".gz"):
                raise InputError(f"{path}: a gzip file cannot be read from the middle; it is one shard")
            self.size = max(0, min(byte_range[1], self.size) - byte_range[0])

    def position(self) -> int:
        raw = self._raw
        if raw is None or raw.closed:
            return self.size if self.records_seen else 0
        return min(self.size, raw.tell() - (self.byte_range[0] if self.byte_range else 0))

    def absolute_line(self, line_no: int) -> int:
        """File line number of the range's `line_no`-th line (newlines before the range are
        counted on first use only: it reads the file up to the range)."""
        if self.byte_range is None or self._first_line_start == 0:
            return line_no
        if self._line_base is None:
            count, done = 0, 0
            with open(self.path, "rb") as f:
                while done < self._first_line_start:
                    chunk = f.read(min(1 << 24, self._first_line_start - done))
                    if not chunk:
                        break
                    count += chunk.count(b"\n")
                    done += len(chunk)
            self._line_base = count
        return self._line_base + line_no

    def _seek_range(self, raw) -> Optional[int]:
        """Position `raw` on the first line starting in the range; returns the range end."""
        if self.byte_range is None:
            return None
        start, end = self.byte_range
        if start > 0:
            raw.seek(start - 1)
            if raw.read(1) != b"\n":
                raw.readline()  # the line in progress belongs to the previous range
        self._first_line_start = raw.tell()
        return end

    def batches(self, keys: Sequence[str], batch_bytes: int, bad: BadRecords, first_index: int) -> Iterator[RecordBatch]:
        with open(self.path, "rb") as raw:
            self._raw = raw
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if self.path.endswith(".gz") else raw
            end = self._seek_range(raw)
            offset = raw.tell()  # start of the next line (ranges only)
            line_no = 0
            try:
                while end is None or offset < end:
                    try:
                        lines = stream.readlines(batch_bytes)
                    except (OSError, EOFError) as exc:  # corrupt or truncated gzip
                        raise InputError(f"{self.path}: cannot read past line {line_no}: {exc}") from exc
                    if end is not None:
                        for i, line in enumerate(lines):
                            if offset >= end:
                                del lines[i:]
                                break
                            offset += len(line)
                    if not lines:
                        break
                    if line_no == 0 and self._first_line_start == 0 and lines[0].startswith(_BOM):
                        lines[0] = lines[0][len(_BOM):]
                    batch = RecordBatch(self.path, {k: [] for k in keys}, [], [], 0)
                    if self.byte_range is not None:
                        batch.absolute_line = self.absolute_line
                    columns = [batch.values[k] for k in keys]
                    for i in range(len(lines)):
                        line, lines[i] = lines[i], None  # the bytes go as soon as they are decoded
                        line_no += 1
                        batch.nbytes += len(line)
                        if not line.strip():
                            continue  # blank lines are not documents
                        try:
                            text = line.decode("utf-8")
                        except UnicodeDecodeError as exc:
                            bad.report(self.path, self.absolute_line(line_no), f"invalid UTF-8 (byte {exc.start} of the line)")
                            continue
                        line = None
                        record = self._parse(text, keys, line_no, bad)
                        text = None
                        if record is None:
                            continue
                        for column, value in zip(columns, record):
                            column.append(value)
                        batch.line_numbers.append(line_no)
                        batch.global_indices.append(first_index + line_no - 1)
                    self.records_seen = line_no
                    lines = line = None  # drop the raw bytes now: a line can be a 200 MB document
                    yield batch
            finally:
                if stream is not raw:
                    stream.close()
                self._raw = None
        self.records_seen = line_no

    def _parse(self, line: str, keys: Sequence[str], line_no: int, bad: BadRecords) -> Optional[List[Value]]:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            # json's messages end in " at" when they point at a position ("starting at")
            where = "column" if exc.msg.endswith(" at") else "at column"
            bad.report(self.path, self.absolute_line(line_no), f"malformed JSON: {exc.msg} {where} {exc.colno}")
            return None
        if not isinstance(obj, dict):
            bad.report(self.path, self.absolute_line(line_no), f"expected a JSON object, got {type(obj).__name__}")
            return None
        values = []
        for key in keys:
            if key not in obj:
                present = ", ".join(repr(k) for k in list(obj)[:10])
                bad.report(self.path, self.absolute_line(line_no), f"missing key {key!r} (keys present: {present or 'none'})")
                return None
            value = obj[key]
            if type(value) is not str:
                problem = value_problem(key, value)
                if problem:
                    bad.report(self.path, self.absolute_line(line_no), problem)
                    return None
            values.append(value)
        if "\\ud" in line or "\\uD" in line:  # only a \u escape can produce a surrogate
            for key, value in zip(keys, values):
                problem = surrogate_problem(key, value)
                if problem:
                    bad.report(self.path, self.absolute_line(line_no), problem)
                    return None
        return values


_SURROGATE = re.compile("[\ud800-\udfff]")


def surrogate_problem(key: str, value: Value) -> Optional[str]:
    """Why `value` is not valid Unicode text (a lone UTF-16 surrogate from a JSON escape such as
    "\\ud800", which no tokenizer can encode), or None."""
    texts = [(None, value)] if isinstance(value, str) else list(enumerate(value))
    for item, text in texts:
        match = _SURROGATE.search(text)
        if match:
            where = f"key {key!r}" if item is None else f"key {key!r}: item {item} of the list"
            return (f"{where}: lone surrogate \\u{ord(match.group()):04x} at character {match.start()} "
                    "(a JSON \\u escape that is half of a UTF-16 pair) is not valid Unicode text")
    return None


def _starts_with_bracket(path: str) -> bool:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip(_BOM + b" \t\r\n")
    return head.startswith(b"[")


def source_for_file(path: str) -> InputSource:
    """The reader for one file, chosen by its name (anything unknown is read as JSON lines, as
    Megatron does)."""
    lower = path.lower()
    if lower.endswith(".parquet"):
        return ParquetSource(path)
    if lower.endswith(".arrow"):
        return ArrowSource(path)
    for suffix, builder in DATASETS_BUILDERS.items():
        if lower.endswith(suffix):
            kwargs = {"delimiter": "\t"} if ".tsv" in suffix else {}
            return DatasetsSource(path, builder, **kwargs)
    if lower.endswith((".json", ".json.gz")) and _starts_with_bracket(path):
        return DatasetsSource(path, "json")  # a JSON array, not JSON lines
    return JsonLinesSource(path)


def _saved_dataset_files(folder: str) -> Optional[List[str]]:
    """Arrow files of a `datasets.save_to_disk` folder in their order, or None if not one."""
    if os.path.isfile(os.path.join(folder, "dataset_dict.json")):
        splits = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
        raise InputError(
            f"{folder} is a saved DatasetDict; pass one split's folder, e.g. {os.path.join(folder, splits[0] if splits else 'train')}"
        )
    state = os.path.join(folder, "state.json")
    if not os.path.isfile(state):
        return None
    with open(state, encoding="utf-8") as f:
        files = [entry["filename"] for entry in json.load(f).get("_data_files", [])]
    return [os.path.join(folder, name) for name in files]


def _is_data_file(name: str) -> bool:
    lower = name.lower()
    known = JSON_LINE_SUFFIXES + (".parquet", ".arrow") + tuple(DATASETS_BUILDERS)
    return not name.startswith(".") and lower.endswith(known)


def read_input_list(path: str) -> List[str]:
    """The inputs named in a list file (`--input @list.txt`): one file, folder or glob per line;
    blank lines and lines starting with # are skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            entries = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    except FileNotFoundError:
        raise InputError(f"--input @{path}: list file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--input @{path}: cannot read the list file: {exc}") from None
    if not entries:
        raise InputError(f"--input @{path}: the list file names no inputs")
    base = os.path.dirname(os.path.abspath(path))  # relative entries are relative to the list file
    return [e if os.path.isabs(e) else os.path.join(base, e) for e in entries]


def open_inputs(spec: str) -> List[InputSource]:
    """Readers for `--input`: a file, a glob pattern, a `save_to_disk` folder, a folder of data
    files (taken in sorted name order, so runs are reproducible) or `@list.txt`, a file listing
    any of these one per line (taken in the list's order)."""
    if spec.startswith("@") and not os.path.exists(spec):
        return [source for entry in read_input_list(spec[1:]) for source in open_inputs(entry)]
    if os.path.isdir(spec):
        saved = _saved_dataset_files(spec)
        if saved is not None:
            return [ArrowSource(p) for p in saved]
        paths = sorted(os.path.join(spec, n) for n in os.listdir(spec) if _is_data_file(n))
        if not paths:
            raise InputError(f"{spec}: folder holds no input files ({', '.join(JSON_LINE_SUFFIXES)}, .parquet, .arrow, ...)")
    elif os.path.isfile(spec):
        paths = [spec]
    else:
        paths = sorted(p for p in glob.glob(spec) if os.path.isfile(p))
        if not paths:
            raise InputError(f"input not found: {spec}")
    return [source_for_file(p) for p in paths]


class InputReader:
    """All sources of `--input` in order, as one stream of batches, with a global record count
    (partition routing) and the on-disk progress used for the ETA."""

    def __init__(self, spec: str, keys: Sequence[str], batch_bytes: int, bad: BadRecords,
                 sources: Optional[List[InputSource]] = None) -> None:
        self.sources = sources if sources is not None else open_inputs(spec)
        self.keys = list(keys)
        self.batch_bytes = batch_bytes
        self.bad = bad
        for source in self.sources:
            source.check_keys(self.keys)
        known = [s.size for s in self.sources if not isinstance(s, DatasetsSource)]
        self.total_bytes: Optional[int] = sum(known) if len(known) == len(self.sources) else None

    def __iter__(self) -> Iterator[RecordBatch]:
        first_index = 0
        done_bytes = 0
        for source in self.sources:
            for batch in source.batches(self.keys, self.batch_bytes, self.bad, first_index):
                batch.position = done_bytes + source.position()
                yield batch
            first_index += source.records_seen
            done_bytes += source.size
