"""Worker processes shared by every preprocessing stage, with results kept in input order.

`WorkerPool(workers)` spawns processes once; corpus builders, the tokenizer trainer and the shard
encoder all submit to it through `map_in_order`, keeping per-process state (a MeCab tagger, an
encoder) in `worker_state`. Errors raised in a worker come back as the same TinyPLMError.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager

from tinyplm_lib.errors import ConfigError, TinyPLMError


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, not the machine's count)."""
    return len(os.sched_getaffinity(0))


def resolve_workers(workers: int | None) -> int:
    """`None` means every available core; otherwise at least 1."""
    if workers is None:
        return available_cores()
    if workers < 1:
        raise ConfigError("workers", f"must be >= 1 (or None for every core), got {workers}")
    return workers


class WorkerPool:
    """`workers` spawned processes that every preprocessing stage can share; 1 runs in-process.

    Stages keep their per-process state (MeCab tagger, encoder) in `worker_state`, built on first
    use, so one pool serves the corpus builders, the tokenizer trainer and the shard encoder
    alike. Use as a context manager; leaving it waits for the tasks already running and cancels
    the queued ones. (Not multiprocessing.Pool: its terminate() can hang for good when a worker
    is still sending a large result, which a stage that stops early provoked here.)
    """

    def __init__(self, workers: int | None = None) -> None:
        self.workers = resolve_workers(workers)
        self._executor: ProcessPoolExecutor | None = None
        if self.workers > 1:
            # spawn, not fork: the caller may hold threads (Dagster, the Rust pool of tokenizers).
            self._executor = ProcessPoolExecutor(self.workers,
                                                 mp_context=multiprocessing.get_context("spawn"))

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def map_in_order(self, func: Callable, items: Iterable) -> Iterator:
        """`func(item)` for every item, computed by the pool, yielded in input order.

        At most 2 * workers items are in flight, so a corpus streams through in flat memory
        (Pool.imap would read its input ahead without bound). A consumer that stops early
        cancels what has not started.
        """
        if self._executor is None:
            yield from map(func, items)
            return
        pending: deque = deque()
        try:
            for item in items:
                pending.append(self._executor.submit(_run_task, func, item))
                if len(pending) >= 2 * self.workers:
                    yield _unwrap(pending.popleft().result())
            while pending:
                yield _unwrap(pending.popleft().result())
        finally:
            for future in pending:
                future.cancel()


class _RemoteError:
    """A TinyPLMError raised in a worker, in a form that pickles: the errors' __init__ takes
    other arguments than `args`, so unpickling the exception itself fails and the pool would
    only report "a process terminated abruptly"."""

    def __init__(self, error: TinyPLMError) -> None:
        self.cls, self.message, self.attrs = type(error), str(error), dict(vars(error))

    def rebuild(self) -> TinyPLMError:
        error = self.cls.__new__(self.cls)
        Exception.__init__(error, self.message)
        vars(error).update(self.attrs)
        return error


def _run_task(func: Callable, item):
    try:
        return func(item)
    except TinyPLMError as error:
        return _RemoteError(error)


def _unwrap(result):
    if isinstance(result, _RemoteError):
        raise result.rebuild()
    return result


def map_in_order(func: Callable, items: Iterable, *, workers: int | None,
                 pool: WorkerPool | None = None) -> Iterator:
    """`func(item)` for every item, in input order: on `pool`, else on a pool made for the call."""
    with pool_or_own(pool, workers) as used:
        yield from used.map_in_order(func, items)


@contextmanager
def pool_or_own(pool: WorkerPool | None, workers: int | None) -> Iterator[WorkerPool]:
    """`pool` when the caller shares one, else a `WorkerPool(workers)` closed on exit."""
    if pool is not None:
        yield pool
        return
    with WorkerPool(workers) as own:
        yield own


_worker_states: dict[tuple, object] = {}


def worker_state(key: tuple, factory: Callable[[], object]) -> object:
    """A per-process object built once by `factory` (a tagger, an encoder), looked up by `key`."""
    state = _worker_states.get(key)
    if state is None:
        if len(_worker_states) >= 8:
            _worker_states.clear()  # one pool outlives many stages: keep only recent states
        state = _worker_states[key] = factory()
    return state
