"""Run `BatchEncoder.encode` over a stream of work units, in order, with bounded look-ahead.

Two ways to use `--workers` cores:
  * InProcessExecutor: a background thread reads and parses ahead while two caller threads keep
    batches in the tokenizer; Rust tokenizers spread `tokenize_batch` over `workers` threads and
    release the GIL while they do. No pickling, no copies between processes.
  * ProcessExecutor: forked worker processes encode whole batches (for tokenizers whose batch
    path holds the GIL: pure-Python ones, and byte-level BPE through the word cache of
    tokenizer/word_cache.py, the fastest path for plain text; and for punkt sentence
    splitting, which is pure Python). Results are numpy arrays,
    cheap to send back; at most 2 x workers batches are in flight, so memory stays bounded.
Both yield results in input order, which the output files depend on.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Tuple

from megatron.training.data_prep.encode import BatchEncoder, EncodedKey, TokenizeError
from megatron.training.data_prep.inputs import RecordBatch


@dataclass
class WorkUnit:
    """A batch of records bound for one partition's builders."""

    partition: int
    batch: RecordBatch


Result = Tuple[WorkUnit, Dict[str, EncodedKey]]
Recover = Callable[[WorkUnit, TokenizeError], Result]  # handles a record the tokenizer rejected

_DONE = object()


def prefetch(items: Iterable[Any], depth: int = 2) -> Iterator[Any]:
    """Iterate `items` in a background thread, at most `depth` items ahead; its exceptions are
    re-raised here, in the consumer, so errors surface with their original message."""
    slots: "queue.Queue[Any]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return  # the consumer stopped early
            offer(_DONE)
        except BaseException as exc:  # handed to the consumer
            offer(exc)

    thread = threading.Thread(target=produce, name="preprocess-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


class InProcessExecutor:
    """Two batches in flight on two caller threads: while one thread's batch is in the Rust
    tokenizer (GIL released), the other packs its result with numpy, so the tokenizer's thread
    pool is not left idle between batches."""

    def __init__(self, encoder: BatchEncoder, recover: Recover, in_flight: int = 2) -> None:
        self.encoder = encoder
        self.recover = recover
        self.in_flight = in_flight
        self.threads = ThreadPoolExecutor(max_workers=in_flight, thread_name_prefix="preprocess-encode")

    def map(self, units: Iterable[WorkUnit]) -> Iterator[Result]:
        window: "deque[Tuple[WorkUnit, Future]]" = deque()
        for unit in prefetch(units):
            window.append((unit, self.threads.submit(self.encoder.encode, unit.batch.values)))
            if len(window) > self.in_flight:
                yield self._collect(*window.popleft())
        while window:
            yield self._collect(*window.popleft())

    def _collect(self, unit: WorkUnit, pending: Future) -> Result:
        try:
            return unit, pending.result()
        except TokenizeError as error:
            return self.recover(unit, error)

    def close(self) -> None:
        self.threads.shutdown(wait=True, cancel_futures=True)


_WORKER_ENCODER: Optional[BatchEncoder] = None
LOCAL_BATCH_BYTES = 16 << 20  # batches of more input bytes than this are encoded in the main process


def _worker_init() -> None:
    # One tokenizer thread per worker process: the processes are the parallelism.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"


def _worker_encode(values: Dict[str, list]) -> Dict[str, EncodedKey]:
    assert _WORKER_ENCODER is not None, "worker started without an encoder"
    return _WORKER_ENCODER.encode(values)


def fork_available() -> bool:
    return "fork" in multiprocessing.get_all_start_methods()


class ProcessExecutor:
    """Forked workers inherit the encoder (tokenizer and splitter) from this process, so nothing
    needs to be rebuilt or pickled per worker."""

    def __init__(self, encoder: BatchEncoder, workers: int, recover: Recover) -> None:
        global _WORKER_ENCODER
        _WORKER_ENCODER = encoder
        self.encoder = encoder
        self.workers = workers
        self.recover = recover
        self.pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_init)

    def map(self, units: Iterable[WorkUnit]) -> Iterator[Result]:
        window: "deque[Tuple[WorkUnit, Any]]" = deque()
        for unit in units:
            # A batch holding a huge document is encoded here, in its turn: sent to a worker it would
            # exist three times at once (here, pickled, unpickled there).
            local = unit.batch.nbytes > LOCAL_BATCH_BYTES
            window.append((unit, None if local else self.pool.apply_async(_worker_encode, (unit.batch.values,))))
            if len(window) >= 2 * self.workers:
                yield self._collect(*window.popleft())
        while window:
            yield self._collect(*window.popleft())

    def _collect(self, unit: WorkUnit, pending: Any) -> Result:
        try:
            return unit, (self.encoder.encode(unit.batch.values) if pending is None else pending.get())
        except TokenizeError as error:
            return self.recover(unit, error)

    def close(self) -> None:
        global _WORKER_ENCODER
        self.pool.terminate()
        self.pool.join()
        _WORKER_ENCODER = None
