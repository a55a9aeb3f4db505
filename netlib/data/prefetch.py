"""Batches prepared ahead of the net by background threads.

:class:`Prefetcher` keeps ``depth`` batches in flight (Caffe's
``data_param.prefetch``, default 4) on a pool of worker threads and hands them
out strictly in batch order.  Batch ``b`` is made by ``make_batch(b)``, a
function of ``b`` alone (the data layers derive its records and its random
choices from the batch index and their seed), so the samples are the same
whatever the number of workers and however the threads interleave.

Decoding (Pillow) and NumPy's array work release the GIL, so the workers run
in parallel with the training thread.  An exception in a worker is raised
again, unchanged, by :meth:`Prefetcher.next` in the training thread, and
nothing after it is served: a failure is never a hang.  :meth:`stop` cancels
what has not started and waits for what has.
"""
import concurrent.futures
import logging
import os
import threading

log = logging.getLogger("netlib")


def default_workers():
    """Worker threads per data layer: ``NETLIB_DATA_WORKERS`` or min(4, CPUs)."""
    env = os.environ.get("NETLIB_DATA_WORKERS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            from ..errors import ConfigError
            raise ConfigError("NETLIB_DATA_WORKERS must be a positive integer, got %r" % env) from None
    return max(1, min(4, os.cpu_count() or 1))


class Prefetcher:
    """Serve ``make_batch(start)``, ``make_batch(start + 1)``, ... in order,
    computing up to ``depth`` of them ahead on ``workers`` threads."""

    def __init__(self, make_batch, start=0, depth=4, workers=None, name="data"):
        self._make = make_batch
        self._depth = max(1, int(depth))
        self._workers = workers or default_workers()
        self._name = name
        self._next_submit = int(start)
        self._pending = []
        self._pool = None
        self._retired = []          # pools stopped without waiting
        self._lock = threading.Lock()
        self._failed = None

    def _ensure_started(self):
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=min(self._workers, self._depth), thread_name_prefix="netlib-%s" % self._name)
        while len(self._pending) < self._depth:
            self._pending.append(self._pool.submit(self._make, self._next_submit))
            self._next_submit += 1

    def start(self):
        """Begin preparing batches now (otherwise the first next() does)."""
        with self._lock:
            if self._failed is None:
                self._ensure_started()

    def next(self):
        """The next batch in order; re-raises a worker's exception."""
        with self._lock:
            if self._failed is not None:
                raise self._failed
            self._ensure_started()
            future = self._pending.pop(0)
        waited = 0.0
        while True:
            try:
                result = future.result(timeout=30.0)
                break
            except concurrent.futures.TimeoutError:
                waited += 30.0
                log.warning("%s: waiting for data: a batch has taken %.0f s to prepare so far", self._name, waited)
            except BaseException as exc:
                with self._lock:
                    self._failed = exc
                self.stop(wait=False)
                raise
        with self._lock:
            if self._failed is None and self._pool is not None:
                self._pending.append(self._pool.submit(self._make, self._next_submit))
                self._next_submit += 1
        return result

    def stop(self, wait=True):
        """Cancel the batches not started and end the threads (after the
        running batches finish; ``wait`` blocks until then, including for
        threads an earlier ``stop(wait=False)`` left running: a worker's
        failure stops the others without waiting, and closing the source
        after that must still wait for them)."""
        with self._lock:
            pending, self._pending = self._pending, []
            if self._pool is not None:
                self._retired.append(self._pool)
            self._pool = None
            pools = list(self._retired)
        for f in pending:
            f.cancel()
        for pool in pools:
            own = threading.current_thread() in getattr(pool, "_threads", ())
            pool.shutdown(wait=wait and not own, cancel_futures=True)
            if wait and not own:
                with self._lock:
                    if pool in self._retired:
                        self._retired.remove(pool)

    def __del__(self):  # pragma: no cover - interpreter-dependent timing
        try:
            pool = self._pool
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass


class BufferPool:
    """Reusable NumPy buffers by (shape, dtype): batches in flight each take
    one and the consumer gives it back once it has copied the batch."""

    def __init__(self):
        self._free = {}
        self._lock = threading.Lock()

    def take(self, shape, dtype):
        import numpy
        key = (tuple(int(d) for d in shape), numpy.dtype(dtype).str)
        with self._lock:
            free = self._free.get(key)
            if free:
                return free.pop()
        return numpy.empty(key[0], dtype=dtype)

    def give(self, array):
        key = (tuple(array.shape), array.dtype.str)
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < 16:
                free.append(array)

