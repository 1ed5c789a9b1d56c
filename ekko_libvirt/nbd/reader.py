"""libnbd side: connect to a point-in-time export, walk block status, read segments.

One control connection walks block status (base:allocation + the dirty-bitmap context). The
backup's reads go through SegmentStream: one thread and one more connection that keep a fixed
number of requests in flight, ahead of the workers that hash, compress and store, into a fixed
pool of segment buffers (memory is bounded by the pool, not by the disk). SegmentReader reads
one segment synchronously, for the odd re-read.
"""

import collections
import logging
import queue
import threading
from typing import Callable, Iterator, List, Optional, Tuple

import nbd

from ..engine.base import Export
from ..errors import ReaderError
from .extents import CoverageTracker, SegmentPlan, flat_to_extents, plan_segments, split_reads

log = logging.getLogger(__name__)

ALLOCATION = "base:allocation"
# block_status count is 32 bits on the wire.
MAX_STATUS_REQUEST = (1 << 32) - (1 << 20)


def close_handle(h) -> None:
    """libnbd 1.14's Python handle has no close(): disconnect politely; the object frees the rest."""
    try:
        h.shutdown()
    except nbd.Error:
        pass


def _connect(export: Export, contexts=()) -> "nbd.NBD":
    """A connection to the export. With `contexts`: the control connection (block status needs
    structured replies). Without: a read connection, on simple replies and with libnbd's
    zeroing of every read buffer off. Why both: a simple reply to a read is its header and
    then exactly the requested bytes, which libnbd receives into the buffer or fails the
    connection (libnbd 1.14, states-reply-simple.c; a structured reply the client did not
    negotiate kills the connection too, states-reply-structured.c), so a successful read has
    written every byte and zeroing it first protects nothing. Under structured replies it would: a server
    could send one data chunk twice and omit another (the byte count still adds up; libnbd's
    own check cannot tell), leaving the previous segment's bytes in a reused buffer. Profiled:
    the zeroing cost 3.6-9% of a full's CPU (0.2-0.55 s: on 2 cores it pulls the buffer's lines
    back from the core of the worker that used it last). On simple replies QEMU's server also
    skips its block-status lookup inside every read (nbd_co_send_sparse_read) for holes that the
    plan has left out already. tests/integration/test_reader_qemu.py."""
    h = nbd.NBD()
    h.set_export_name(export.export_name)
    for c in contexts:
        h.add_meta_context(c)
    if not contexts:
        h.set_request_structured_replies(False)
        h.set_pread_initialize(False)
    try:
        h.connect_unix(export.socket_path)
    except nbd.Error as e:
        raise ReaderError(f"cannot connect to NBD export {export.export_name!r} at "
                          f"{export.socket_path}: {e}") from e
    return h


class ExportReader:
    def __init__(self, export: Export, request_size: int, in_flight: int):
        self.export = export
        contexts = [ALLOCATION] + ([export.dirty_context] if export.dirty_context else [])
        self.h = _connect(export, contexts)
        # The silent-data-loss trap: an export that lacks the bitmap context never calls the
        # block-status callback for it, which naive code reads as "nothing changed".
        if export.dirty_context and not self.h.can_meta_context(export.dirty_context):
            close_handle(self.h)
            raise ReaderError(f"NBD export {export.export_name!r} does not offer "
                              f"{export.dirty_context}: refusing to read it as 'no changes'")
        self.has_allocation = bool(self.h.can_meta_context(ALLOCATION))
        self.size = self.h.get_size()
        max_req = self.h.get_block_size(nbd.SIZE_MAXIMUM) or 32 << 20
        self.request_size = min(request_size, max_req)
        self.in_flight = max(1, in_flight)

    def close(self) -> None:
        close_handle(self.h)

    def plans(self, seg: int) -> Iterator[SegmentPlan]:
        """Segments to back up, in disk order, computed window by window."""
        contexts = [ALLOCATION] if self.has_allocation else []
        if self.export.dirty_context:
            contexts.append(self.export.dirty_context)
        if not contexts:
            yield from plan_segments(0, -(-self.size // seg), seg, self.size, None, None)
            return
        tracker = CoverageTracker(contexts, seg, self.size)
        while True:
            start, end = tracker.ready()
            if end > start:
                alloc = tracker.extents.get(ALLOCATION) if self.has_allocation else None
                dirty = tracker.extents.get(self.export.dirty_context) if self.export.dirty_context else None
                yield from plan_segments(start, end, seg, self.size, alloc, dirty)
                tracker.take(end)
            pos = tracker.position()
            if pos >= self.size:
                return
            self._status(tracker, pos, min(self.size - pos, MAX_STATUS_REQUEST))

    def _status(self, tracker: CoverageTracker, offset: int, count: int) -> None:
        replies = []

        def cb(context, off, entries, err):
            # Never call the handle from inside the callback: only record.
            replies.append((context, off, list(entries)))
            return 0

        try:
            self.h.block_status(count, offset, cb)
        except nbd.Error as e:
            raise ReaderError(f"block status at {offset} failed: {e}") from e
        seen = set()
        for context, off, entries in replies:
            if context in tracker.extents:
                try:
                    tracker.add(context, flat_to_extents(off, entries))
                except ValueError as e:          # a zero-length extent: a broken or hostile server
                    raise ReaderError(f"NBD server sent bad block status for {context} at {off}: {e}") from e
                seen.add(context)
        missing = set(tracker.extents) - seen
        if missing:
            raise ReaderError(f"NBD server sent no block status for {', '.join(sorted(missing))} "
                              f"at offset {offset}")

    def worker(self) -> "SegmentReader":
        return SegmentReader(self.export, self.request_size, self.in_flight)

    def stream(self, plans, buffers: int) -> "SegmentStream":
        return SegmentStream(self.export, plans, self.request_size, self.in_flight, buffers)


class SegmentBuffer:
    """A reusable segment-sized buffer. libnbd 1.14's Python binding keeps one reference to the
    object behind every aio_pread buffer forever, so a fresh bytearray per segment was never
    freed (measured: RSS grew by every byte read). Buffers are therefore reused, and the views
    handed to aio_pread are cached per (offset, length), so the leaked references pile up on a
    bounded set of small objects."""

    MAX_VIEWS = 1 << 16

    def __init__(self, size: int, pool: "Optional[queue.SimpleQueue]" = None):
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.zeros = memoryview(bytes(size))
        self.views: dict = {}
        self.pool = pool
        self.length = 0

    def nbd_view(self, rel: int, n: int) -> "nbd.Buffer":
        v = self.views.get((rel, n))
        if v is None:
            if len(self.views) >= self.MAX_VIEWS:
                self.views.clear()
            v = self.views[(rel, n)] = nbd.Buffer.from_buffer(self.view[rel:rel + n])
        return v

    def requests(self, plan: SegmentPlan, request_size: int):
        """(buffer view, disk offset) of each read of `plan`; zero-fills the holes between them."""
        self.length = plan.length
        pos = 0
        out = []
        for off, n in split_reads(plan.reads, request_size):
            rel = off - plan.offset
            if rel > pos:    # a hole between data ranges reads as zeros
                self.view[pos:rel] = self.zeros[:rel - pos]
            pos = rel + n
            out.append((self.nbd_view(rel, n), off))
        if plan.length > pos:
            self.view[pos:plan.length] = self.zeros[:plan.length - pos]
        return out

    @property
    def data(self):
        """The segment's bytes: the buffer itself (a copy only for a short last segment)."""
        return self.buf if self.length == len(self.buf) else bytes(self.view[:self.length])

    def release(self) -> None:
        """Back to the stream's pool: the caller is done with `data`."""
        if self.pool is not None:
            self.pool.put(self)


_END = object()
_BATCH = 64     # plans per hand-over between the threads (a sparse 1 TiB disk has 10^6 of them)


class SegmentStream:
    """Reads the segments of `plans` ahead of their consumers, in disk order.

    Two threads. The planner walks `plans` (block status on the control connection) and hands
    them over in batches; the reader keeps at most `in_flight` requests of `request_size`
    outstanding on its own connection, into `buffers` reusable segment buffers. Iterating
    yields (plan, buffer) in the order of `plans`; buffer is None for a segment with nothing
    to read (all zeros). The consumer calls buffer.release() when it has stored the segment;
    until then the buffer is not reused, and when all are taken the reader waits: the pool is
    the backpressure, so memory stays at `buffers` segments whatever the disk size.

    Why two threads: the reader must keep consuming its replies while block status is asked
    on the other connection. QEMU 7.2 can wait, in its main loop, for a read reply that cannot
    be sent until the client reads; a client blocked in block_status at that moment hangs
    both (seen: a 1 TiB sparse full never finished). The planner never touches the read
    connection, and the reader never waits for the planner while it has reads outstanding.

    Measured on QEMU 7.2: a bounded number of requests in flight on one connection costs
    QEMU's NBD server less CPU per GiB than the same bytes spread over one connection per
    worker, and requests under 1 MiB avoid its page faults (see bench/, README "Benchmark")."""

    def __init__(self, export: Export, plans, request_size: int, in_flight: int, buffers: int,
                 connect: Optional[Callable[[Export], "nbd.NBD"]] = None):
        """`connect`: opens the read connection (libnbd; a fake handle in the schedule tests)."""
        self.export = export
        self.connect = connect or _connect
        self.plans = plans
        self.request_size = request_size
        self.in_flight = max(1, in_flight)
        self.pool: queue.SimpleQueue = queue.SimpleQueue()
        self.nbuffers = max(1, buffers)
        self.made = 0
        self.planned: queue.Queue = queue.Queue(maxsize=64)     # batches of plans
        self.out: queue.Queue = queue.Queue(maxsize=64)         # batches of (plan, buffer)
        self.stop = threading.Event()
        self.threads: List[threading.Thread] = []

    def __iter__(self) -> Iterator[Tuple[SegmentPlan, Optional[SegmentBuffer]]]:
        self.threads = [threading.Thread(target=self._plan, name="ekko-plan", daemon=True),
                        threading.Thread(target=self._read, name="ekko-read", daemon=True)]
        for t in self.threads:
            t.start()
        while True:
            item = self.out.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield from item

    def close(self) -> None:
        """Stop (after an error of the consumer, or at the end) and wait for both threads."""
        self.stop.set()
        while any(t.is_alive() for t in self.threads):
            for q in (self.out, self.planned):      # unblock a put() on a full queue
                try:
                    item = q.get(timeout=0.02)
                except queue.Empty:
                    continue
                if q is self.out and isinstance(item, list):
                    for _plan, buf in item:
                        if buf is not None:
                            buf.release()
        self.threads = []
        self.out.put(_END)      # a consumer still waiting in __iter__ returns

    # -- the planning thread ---------------------------------------------------------------------
    def _plan(self) -> None:
        try:
            batch = []
            for plan in self.plans:
                if self.stop.is_set():
                    return
                batch.append(plan)
                if len(batch) >= _BATCH:
                    self.planned.put(batch)
                    batch = []
            self.planned.put(batch)
            self.planned.put(_END)
        except BaseException as e:   # noqa: BLE001 - handed to the reader, then the consumer
            self.planned.put(e)

    # -- the reading thread ----------------------------------------------------------------------
    def _read(self) -> None:
        h = None
        pending: dict = {}                   # cookie -> the _Slot its read fills
        order: collections.deque = collections.deque()   # _Slots in disk order
        try:
            h = self.connect(self.export)
            while not self.stop.is_set():
                batch = self._next_batch(h, pending, order)
                if batch is _END:
                    break
                for plan in batch:
                    if plan.is_zero:
                        order.append(_Slot(plan, None, sealed=True))
                        continue
                    buf = self._buffer(plan.length, h, pending, order)
                    slot = _Slot(plan, buf)
                    order.append(slot)
                    for view, off in buf.requests(plan, self.request_size):
                        while len(pending) >= self.in_flight:
                            self._progress(h, pending, order)
                        pending[h.aio_pread(view, off)] = slot
                        slot.outstanding += 1
                    # Only now may the slot be handed over: until its last read was issued, a
                    # count of 0 outstanding meant "reads still to come", not "done".
                    slot.sealed = True
                self._emit(order)
            while pending:
                self._progress(h, pending, order)
            self._emit(order)
            self.out.put(_END)
        except nbd.Error as e:
            self.out.put(ReaderError(f"NBD read failed: {e}"))
        except BaseException as e:   # noqa: BLE001 - handed to the consumer, raised there
            self.out.put(e)
        finally:
            if h is not None:
                try:
                    while pending:           # libnbd still writes into our buffers: let it finish
                        self._reap(h, pending)
                except nbd.Error:
                    pass
                close_handle(h)

    def _next_batch(self, h, pending, order):
        """The next batch of plans; while the planner is busy, keep reading what is in flight."""
        while True:
            try:
                item = self.planned.get_nowait()
            except queue.Empty:
                if pending:
                    self._progress(h, pending, order)
                    continue
                self._emit(order)
                item = self.planned.get()
            if isinstance(item, BaseException):
                raise item
            return item

    def _buffer(self, size: int, h, pending, order) -> SegmentBuffer:
        while True:
            try:
                b = self.pool.get_nowait()
            except queue.Empty:
                if self.made < self.nbuffers:
                    self.made += 1
                    return SegmentBuffer(size, self.pool)
                if pending:                  # complete reads meanwhile: they free the consumers
                    self._progress(h, pending, order)
                    continue
                self._emit(order)
                b = self.pool.get()          # everything is with the consumers: wait for one
            if len(b.buf) >= size:
                return b
            self.made -= 1                   # a smaller buffer (short segment first): replace it

    def _progress(self, h, pending: dict, order) -> None:
        """Wait for at least one outstanding read; emit the segments that are complete."""
        for slot in self._reap(h, pending):
            slot.outstanding -= 1
        self._emit(order)

    @staticmethod
    def _reap(h, pending: dict) -> list:
        """Retire the reads that completed, waiting for one only if none has: libnbd may have
        completed them all already (it reads replies while it issues requests), and a poll
        with nothing in flight would wait for ever. -> the slots of the retired reads."""
        done = [c for c in pending if h.aio_command_completed(c)]
        while not done:
            h.poll(-1)
            done = [c for c in pending if h.aio_command_completed(c)]
        return [pending.pop(c) for c in done]

    def _emit(self, order) -> None:
        """Hand over the complete segments at the head of `order`, in disk order."""
        ready = []
        while order and order[0].sealed and order[0].outstanding == 0:
            slot = order.popleft()
            ready.append((slot.plan, slot.buf))
        if ready:
            self.out.put(ready)


class _Slot:
    """A segment on its way through the reading thread: its buffer, how many of its reads are
    in flight, and whether all of them were issued (sealed). Handed over when sealed and 0."""

    __slots__ = ("plan", "buf", "outstanding", "sealed")

    def __init__(self, plan: SegmentPlan, buf: Optional[SegmentBuffer], sealed: bool = False):
        self.plan = plan
        self.buf = buf
        self.outstanding = 0
        self.sealed = sealed


class SegmentReader:
    """One connection; reads one segment's data ranges into its own reused buffer (see
    SegmentBuffer), zeros elsewhere. What read() returns is valid until the next read()."""

    def __init__(self, export: Export, request_size: int, in_flight: int):
        self.h = _connect(export)
        self.request_size = request_size
        self.in_flight = in_flight
        self._sb: Optional[SegmentBuffer] = None

    def read(self, plan: SegmentPlan):
        if self._sb is None or len(self._sb.buf) < plan.length:
            self._sb = SegmentBuffer(plan.length)
        pending: List[int] = []             # libnbd's cookies
        try:
            for view, off in self._sb.requests(plan, self.request_size):
                while len(pending) >= self.in_flight:
                    self._reap(pending)
                pending.append(self.h.aio_pread(view, off))
            while pending:
                self._reap(pending)
        except nbd.Error as e:
            raise ReaderError(f"NBD read of segment {plan.index} (offset {plan.offset}) failed: {e}") from e
        return self._sb.data

    def _reap(self, pending) -> None:
        """Wait until at least one pending request has completed; raises its error."""
        while True:
            done = [c for c in pending if self.h.aio_command_completed(c)]
            if done:
                for c in done:
                    pending.remove(c)
                return
            self.h.poll(-1)

    def close(self) -> None:
        close_handle(self.h)
