"""One backup's disk as a stream of bytes, in order, for a consumer that cannot seek (an HTTP
upload: Glance's PUT /v2/images/{id}/file, api/glance.py).

    raw     the disk from byte 0 to its end: data segments decoded, zero segments generated
    qcow2   a complete qcow2 (qcow2.py's layout): the metadata first, then the data segments in
            disk order; zero segments are not in the file at all

The qcow2 is possible without seeking because qcow2.plan puts every piece of metadata before the
data, and its content depends on the manifest alone when every cluster of a data segment is
mapped (`qcow2.metadata` without an Allocation): the clusters of zeros inside a data segment are
then sent and stored, which the file restore (restore/disk.py) leaves unallocated instead.

Every data segment is fetched, decoded and re-hashed (segment.decode, as every restore) before a
byte of it is yielded; a missing or damaged one raises IntegrityError naming the segment and its
disk offset, and the stream stops there. Fetching runs `workers` segments ahead in a thread pool,
handed over in disk order; memory: about 2 x workers segments.
"""

import concurrent.futures as cf
import functools
from typing import Iterable, Iterator, List, Tuple

from ..errors import IntegrityError, ObjectNotFound, UsageError
from ..format import segment
from ..format.manifest import Manifest
from ..store.base import Store
from . import qcow2
from .disk import RecentSegments

FORMATS = ("raw", "qcow2")
ZERO_CHUNK = 4 << 20        # zeros are yielded in pieces of this size (one buffer, reused)


def disk_stream(store: Store, m: Manifest, fmt: str, workers: int = 4) -> Iterator[bytes]:
    """The disk of manifest `m` in format `fmt` (raw or qcow2), as consecutive pieces of bytes."""
    if fmt == "raw":
        return _raw(store, m, workers)
    if fmt == "qcow2":
        if not qcow2.can_write(m.segment_size):
            raise UsageError(f"backup {m.backup_id}: its segment size {m.segment_size} is not a whole number of "
                             f"{qcow2.C}-byte clusters, so it streams as raw only")
        return _qcow2(store, m, workers)
    raise UsageError(f"disk format must be one of {', '.join(FORMATS)}, not {fmt!r}")


def stream_size(m: Manifest, fmt: str) -> int:
    """How many bytes disk_stream yields (raw: the virtual size; qcow2: the file's length)."""
    if fmt == "raw":
        return m.virtual_size
    return qcow2.plan(m.virtual_size, m.segment_size, (i for i, _ in m.table.data_entries())).file_size


def _raw(store: Store, m: Manifest, workers: int) -> Iterator[bytes]:
    pos = 0
    for index, raw in _decoded(store, m, workers):
        yield from _zeros(index * m.segment_size - pos)
        yield raw
        pos = index * m.segment_size + len(raw)
    yield from _zeros(m.virtual_size - pos)


def _qcow2(store: Store, m: Manifest, workers: int) -> Iterator[bytes]:
    layout = qcow2.plan(m.virtual_size, m.segment_size, (i for i, _ in m.table.data_entries()))
    pos = 0
    for offset, data in qcow2.metadata(layout, (i for i, _ in m.table.data_entries())):
        if offset < pos:        # qcow2.plan orders every structure by file offset; a change there must show
            raise AssertionError(f"qcow2 metadata at {offset} behind {pos}: not streamable")
        yield from _zeros(offset - pos)
        yield data
        pos = offset + len(data)
    yield from _zeros(layout.data - pos)
    pos = layout.data
    for _, raw in _decoded(store, m, workers):
        yield raw
        pos += len(raw)
        pad = -len(raw) % qcow2.C       # only the disk's last segment can end inside a cluster
        yield from _zeros(pad)
        pos += pad
    if pos != layout.file_size:
        raise AssertionError(f"qcow2 stream of {pos} bytes, its layout says {layout.file_size}")


def _zeros(n: int) -> Iterator[bytes]:
    chunk = _zero_chunk()
    while n > 0:
        yield chunk[:n] if n < len(chunk) else chunk
        n -= len(chunk)


@functools.lru_cache(maxsize=1)
def _zero_chunk() -> bytes:
    """One buffer of zeros, made on first use (not at import: the API imports this lazily too)."""
    return bytes(ZERO_CHUNK)


def _decoded(store: Store, m: Manifest, workers: int) -> Iterator[Tuple[int, bytes]]:
    """(index, verified bytes) of every data segment, in disk order; fetched `workers` ahead."""
    recent = RecentSegments(workers * 4)

    def one(index: int, d: bytes) -> bytes:
        key = segment.segment_key(d)
        offset = index * m.segment_size
        length = min(m.segment_size, m.virtual_size - offset)
        try:
            raw = recent.get(d)
            if raw is None:
                raw = recent.put(d, segment.decode(store.get(key), d, codec=store.codec))
        except (IntegrityError, ObjectNotFound) as e:     # a store that does not answer stays a StoreError
            raise IntegrityError(f"backup {m.backup_id}: segment {index} at disk offset {offset} ({key}): {e}") from e
        if len(raw) != length:
            raise IntegrityError(f"backup {m.backup_id}: segment {index} at disk offset {offset} ({key}): "
                                 f"{len(raw)} bytes where the disk needs {length}")
        return raw

    with cf.ThreadPoolExecutor(max(1, workers), thread_name_prefix="ekko-stream") as pool:
        window: List[Tuple[int, "cf.Future[bytes]"]] = []
        try:
            for index, d in _entries(m):
                window.append((index, pool.submit(one, index, d)))
                if len(window) > workers:
                    i, f = window.pop(0)
                    yield i, f.result()
            for i, f in window:
                yield i, f.result()
        finally:                    # the consumer stopped (an upload failed) or a segment did
            for _, f in window:
                f.cancel()


def _entries(m: Manifest) -> Iterable[Tuple[int, bytes]]:
    return m.table.data_entries()
