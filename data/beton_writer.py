"""FFCV's .beton writer with a wait that watches its worker processes.

FFCV 1.0.2's DatasetWriter polls a shared counter until every sample is written and never looks at the
processes that write them: a worker that dies (an exception, a signal, the kernel's OOM killer) leaves it
waiting forever, with the metadata's shared memory never released. write_indexed runs the same protocol
(FFCV's own worker function, queues, allocator and file layout, so the file is byte for byte FFCV's) and ends
with an error that names the dead worker's exit code; on every way out (that error, Ctrl-C, a test's
timeout) the workers are stopped and the shared memory released.
"""
from __future__ import annotations

import ctypes
import functools
import multiprocessing as mp
import signal
import time
from multiprocessing.process import BaseProcess
from queue import Empty

# FFCV's workers inherit the data set, the fields and the allocator (none has to be picklable): fork, as in FFCV
_FORK = mp.get_context("fork")


class WriterDied(RuntimeError):
    """A writer process ended before every sample was written."""


@functools.cache
def _writer_class():
    """DatasetWriter with the watched wait, made on first use (FFCV is an optional dependency)."""
    from ffcv.memory_allocator import MemoryAllocator
    from ffcv.writer import DatasetWriter

    class WatchedWriter(DatasetWriter):
        def _write_common(self, num_samples, queue_content, work_fn, extra_worker_args):
            self.num_samples = num_samples
            self.prepare()  # writes the header, creates self.metadata_sm
            processes: list[BaseProcess] = []
            written = False
            workqueue, allocations_queue = _FORK.Queue(), _FORK.Queue()
            try:
                for todo in queue_content:
                    workqueue.put(todo)
                for _ in range(self.num_workers):
                    workqueue.put(None)  # one end-of-work token per worker
                done = _FORK.Value(ctypes.c_uint64, 0)  # the workers add to it under its lock
                allocator = MemoryAllocator(self.fname, self.data_region_start, self.page_size)
                args = (workqueue, self.metadata_sm, self.metadata_type, self.fields, allocator, done,
                        allocations_queue, *extra_worker_args)
                processes = [_FORK.Process(target=_without_sigint, args=(work_fn, *args), daemon=True)
                             for _ in range(self.num_workers)]
                for p in processes:
                    p.start()
                count = done.get_obj()  # read without the lock: a worker killed while holding it must not stop us
                _wait_for_samples(processes, count, num_samples)
                allocations = []
                for _ in processes:  # each worker puts its allocation table once, as its last act
                    allocations.extend(_get_while_alive(allocations_queue, processes, num_samples))
                self.finalize(allocations)
                written = True
            finally:
                _stop(processes, grace_s=5.0 if written else 0.0)
                if not written:  # work nobody will read must not hold this process's exit (a full pipe)
                    workqueue.cancel_join_thread()
                self.metadata_sm.close()
                self.metadata_sm.unlink()

    return WatchedWriter


def _dead(processes: list[BaseProcess], done: int, total: int) -> WriterDied | None:
    """The error for a worker that failed, or for all having ended with samples left; None while all is well."""
    for p in processes:
        if p.exitcode not in (None, 0):
            how = f"signal {-p.exitcode}" if p.exitcode < 0 else f"exit code {p.exitcode}"
            return WriterDied(f"a .beton writer process (pid {p.pid}) ended with {how} after processing {done} of "
                              f"{total} samples (its error, if any, is printed above)")
    if all(p.exitcode == 0 for p in processes) and done < total:
        return WriterDied(f"the .beton writer processes ended after {done} of {total} samples")
    return None


def _wait_for_samples(processes: list[BaseProcess], count: ctypes.c_uint64, total: int, poll_s: float = 0.1) -> None:
    from tqdm import tqdm

    with tqdm(total=total) as progress:
        while (done := int(count.value)) < total:
            if (error := _dead(processes, done, total)) is not None:
                raise error
            progress.update(done - progress.n)
            time.sleep(poll_s)
        progress.update(total - progress.n)


def _get_while_alive(queue, processes: list[BaseProcess], total: int):
    """The next worker's allocation table; a worker puts it before it exits, so an empty queue once all have
    exited (or once one has failed) means a table will never come."""
    while True:
        try:
            return queue.get(timeout=1.0)
        except Empty:
            if (error := _dead(processes, total, total)) is not None:
                raise error from None
            if all(p.exitcode is not None for p in processes):
                raise WriterDied("the .beton writer processes ended without reporting where they wrote") from None


def _stop(processes: list[BaseProcess], grace_s: float) -> None:
    """Reaps the workers: after a complete write they are exiting and get grace_s to do so; after a failed or
    interrupted one they are terminated at once (SIGKILL for one that ignores SIGTERM for 10 s)."""
    for p in processes:
        if p.pid is not None and p.is_alive():
            p.join(timeout=grace_s)
            if p.is_alive():
                p.terminate()
    for p in processes:
        if p.pid is not None:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()


def _without_sigint(work_fn, *args) -> None:
    """A writer process: a terminal's Ctrl-C reaches it too; the parent decides (it stops its workers) and says so
    once, instead of every worker printing a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    work_fn(*args)


def write_indexed(path: str, fields: dict, dataset, num_workers: int = -1) -> None:
    """Writes dataset[i] for every i (tuples in the order of `fields`) to the .beton `path`, with
    `num_workers` processes (< 1: all cores), raising WriterDied when one of them dies."""
    _writer_class()(str(path), fields, num_workers=num_workers).from_indexed_dataset(dataset)
