"""Columnar inputs: Parquet, Arrow IPC (what `datasets.save_to_disk` writes) and any other local
file the `datasets` library streams (CSV, TSV, text, JSON arrays).

Why: corpora often arrive as Parquet shards or saved Hugging Face datasets rather than JSON lines.
Each reader pulls only the needed columns, a bounded number of rows at a time, with plain reads
rather than memory maps, so the resident memory does not grow with the input.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Sequence

from megatron.training.data_prep.records import BadRecords, InputError, InputSource, RecordBatch, Value, value_problem


class _ColumnarSource(InputSource):
    """Shared row validation for Arrow-backed sources (Parquet, Arrow IPC, `datasets`)."""

    unit = "row"

    def _batch_from_columns(
        self, columns: Dict[str, List[Value]], first_row: int, first_index: int, nbytes: int, bad: BadRecords
    ) -> RecordBatch:
        keys = list(columns)
        n = len(columns[keys[0]]) if keys else 0
        batch = RecordBatch(self.path, {k: [] for k in keys}, [], [], nbytes)
        for i in range(n):
            row = first_row + i + 1
            values = []
            for key in keys:
                value = columns[key][i]
                problem = None if type(value) is str else value_problem(key, value)
                if problem:
                    bad.report(self.path, row, problem, unit="row")
                    break
                values.append(value)
            else:
                for key, value in zip(keys, values):
                    batch.values[key].append(value)
                batch.line_numbers.append(row)
                batch.global_indices.append(first_index + row - 1)
        return batch


class ParquetSource(_ColumnarSource):
    """Parquet read row group by row group, only the needed columns."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import pyarrow.parquet as pq

        try:
            self._file = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for foreign files
            raise InputError(f"{path}: not a readable Parquet file: {exc}") from exc
        self._rows = self._file.metadata.num_rows

    def check_keys(self, keys: Sequence[str]) -> None:
        _check_columns(self.path, self._file.schema_arrow.names, keys)

    def position(self) -> int:
        return self.size * self.records_seen // self._rows if self._rows else self.size

    def batches(self, keys: Sequence[str], batch_bytes: int, bad: BadRecords, first_index: int) -> Iterator[RecordBatch]:
        # Rows per batch from the uncompressed size of the needed columns only. pyarrow decodes a
        # row group's column chunks at a time, so memory is bounded by the writer's row group size.
        meta = self._file.metadata
        total = 0
        for i in range(meta.num_row_groups):
            group = meta.row_group(i)
            for j in range(group.num_columns):
                column = group.column(j)
                if column.path_in_schema.split(".")[0] in keys:
                    total += column.total_uncompressed_size
        rows = max(1, min(65536, batch_bytes * max(self._rows, 1) // max(total, 1)))
        for record_batch in self._file.iter_batches(batch_size=rows, columns=list(keys)):
            columns = {k: record_batch.column(k).to_pylist() for k in keys}
            batch = self._batch_from_columns(columns, self.records_seen, first_index, record_batch.nbytes, bad)
            self.records_seen += record_batch.num_rows
            yield batch


class ArrowSource(_ColumnarSource):
    """An Arrow IPC file, stream or file format (what `datasets.save_to_disk` writes), read one
    record batch at a time through ordinary reads rather than a memory map, so RSS stays bounded."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        import pyarrow as pa

        self._pa = pa
        self._file = None
        try:
            with pa.OSFile(path) as f:
                self._schema = pa.ipc.open_stream(f).schema
                self._stream = True
        except pa.ArrowInvalid:
            try:
                with pa.OSFile(path) as f:
                    self._schema = pa.ipc.open_file(f).schema
                    self._stream = False
            except pa.ArrowInvalid as exc:
                raise InputError(f"{path}: not an Arrow IPC file or stream: {exc}") from exc

    def check_keys(self, keys: Sequence[str]) -> None:
        _check_columns(self.path, self._schema.names, keys)

    def position(self) -> int:
        f = self._file
        return f.tell() if f is not None and not f.closed else (self.size if self.records_seen else 0)

    def _record_batches(self) -> Iterator[Any]:
        pa = self._pa
        with pa.OSFile(self.path) as f:
            self._file = f
            if self._stream:
                yield from pa.ipc.open_stream(f)
            else:
                reader = pa.ipc.open_file(f)
                for i in range(reader.num_record_batches):
                    yield reader.get_batch(i)
        self._file = None

    def batches(self, keys: Sequence[str], batch_bytes: int, bad: BadRecords, first_index: int) -> Iterator[RecordBatch]:
        pending: List[Any] = []
        pending_bytes = 0
        for record_batch in self._record_batches():
            pending.append(record_batch.select(list(keys)))
            pending_bytes += pending[-1].nbytes
            if pending_bytes >= batch_bytes:
                yield self._flush(pending, pending_bytes, keys, bad, first_index)
                pending, pending_bytes = [], 0
        if pending:
            yield self._flush(pending, pending_bytes, keys, bad, first_index)

    def _flush(self, pending: List[Any], nbytes: int, keys: Sequence[str], bad: BadRecords, first_index: int) -> RecordBatch:
        table = self._pa.Table.from_batches(pending)
        columns = {k: table.column(k).to_pylist() for k in keys}
        batch = self._batch_from_columns(columns, self.records_seen, first_index, nbytes, bad)
        self.records_seen += table.num_rows
        return batch


class DatasetsSource(_ColumnarSource):
    """Any other local file the `datasets` library reads (CSV, TSV, text, JSON arrays), streamed
    with `load_dataset(..., streaming=True)`."""

    def __init__(self, path: str, builder: str, **kwargs: Any) -> None:
        super().__init__(path)
        self._builder = builder
        self._kwargs = kwargs

    def position(self) -> int:
        return 0  # unknown while streaming; no ETA for these inputs

    def batches(self, keys: Sequence[str], batch_bytes: int, bad: BadRecords, first_index: int) -> Iterator[RecordBatch]:
        import datasets

        stream = datasets.load_dataset(self._builder, data_files=[self.path], split="train", streaming=True, **self._kwargs)
        checked = False
        for chunk in stream.iter(batch_size=1024):
            if not checked:
                _check_columns(self.path, list(chunk), keys)
                checked = True
            columns = {k: chunk[k] for k in keys}
            nbytes = sum(len(v) for v in columns[keys[0]] if isinstance(v, str)) if keys else 0
            batch = self._batch_from_columns(columns, self.records_seen, first_index, nbytes, bad)
            self.records_seen += len(columns[keys[0]]) if keys else 0
            yield batch


def _check_columns(path: str, names: Sequence[str], keys: Sequence[str]) -> None:
    missing = [k for k in keys if k not in names]
    if missing:
        raise InputError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(map(repr, names))})")
