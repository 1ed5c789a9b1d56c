"""A batch whose puts run on their own threads: uploads overlap the segment work.

A store whose put is a network round trip (Swift: one PUT per segment, ~5-20 ms each) would
otherwise hold a backup's workers for every round trip: with 2 workers that is ~100-200 PUTs/s
whatever the link. PipelinedBatch hands each object to one of `threads` uploader threads (each
with its own connection, reused for every object it sends) through a queue of at most `depth`
objects, so the workers go back to hashing and compressing at once and memory stays bounded:
`depth` objects queued plus one per uploader in flight.

Contract (store/base.py, Batch): flush() returns once every object put so far is stored, and
raises the first failure; a put after a failure raises it at once (the backup fails before
doing more work); abort() drops what is queued and waits for the uploads in flight, so nothing
is sent after it returns. Objects already sent stay: on Swift a put is visible at once, and an
aborted backup's segments are garbage that gc removes after its grace period.
"""

import logging
import queue
import threading
from typing import Callable, List, Optional, Tuple

from .base import Batch

log = logging.getLogger(__name__)

_STOP = None        # the queue item that ends an uploader thread
_POLL = 0.5         # seconds: a blocked put() looks at failures this often


class PipelinedBatch(Batch):
    def __init__(self, put: Callable[[str, bytes], None], threads: int, depth: Optional[int] = None,
                 name: str = "ekko-put"):
        if threads < 1:
            raise ValueError(f"threads must be >= 1, not {threads}")
        self._put = put
        self._threads = threads
        self._name = name
        self._queue: "queue.Queue[Optional[Tuple[str, bytes]]]" = queue.Queue(depth or 2 * threads)
        self._running: List[threading.Thread] = []
        self._failed: List[BaseException] = []
        self._aborted = threading.Event()
        self._lock = threading.Lock()

    # ---- the callers' side ----------------------------------------------------------------
    def put(self, key: str, data: bytes) -> None:
        self._raise_failure()
        if self._aborted.is_set():
            raise RuntimeError("put() after abort()")
        self._start()
        while True:     # blocks while `depth` objects wait; wakes to see an uploader's failure
            try:
                self._queue.put((key, data), timeout=_POLL)
                return
            except queue.Full:
                self._raise_failure()

    def flush(self) -> None:
        self._stop_uploaders()
        self._raise_failure()

    def abort(self) -> None:
        self._aborted.set()
        self._drain()
        self._stop_uploaders()

    # ---- the uploaders ----------------------------------------------------------------------
    def _start(self) -> None:
        with self._lock:
            if self._running:
                return
            for i in range(self._threads):
                t = threading.Thread(target=self._upload, name=f"{self._name}_{i}", daemon=True)
                t.start()
                self._running.append(t)

    def _upload(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._failed or self._aborted.is_set():
                    continue        # the batch has failed: what is left is dropped, not sent
                key, data = item
                self._put(key, data)
            except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by put/flush
                with self._lock:
                    self._failed.append(e)
            finally:
                self._queue.task_done()

    def _stop_uploaders(self) -> None:
        """Every queued object sent (or dropped after a failure), then the threads end: a batch
        leaves no thread behind (the agent runs for months, one batch per backup)."""
        with self._lock:
            running, self._running = self._running, []
        for _ in running:
            self._queue.put(_STOP)
        for t in running:
            t.join()

    def _drain(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
            self._queue.task_done()

    def _raise_failure(self) -> None:
        with self._lock:
            failure = self._failed[0] if self._failed else None
        if failure is not None:
            raise failure
