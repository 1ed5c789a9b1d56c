"""PipelinedBatch (store/uploader.py): the batch Swift's puts go through. Every object is sent
once flush() returns; the first failure is raised and nothing queued after it is sent; abort()
sends nothing more once it returns; memory is bounded by the queue; no thread outlives a batch."""

import random
import threading

import pytest

from ekko_libvirt.errors import StoreError
from ekko_libvirt.store.uploader import PipelinedBatch


def _uploaders():
    return [t for t in threading.enumerate() if t.name.startswith("test-put")]


class Recorder:
    def __init__(self, fail_on=None, gate=None):
        self.sent = {}
        self.lock = threading.Lock()
        self.fail_on = fail_on
        self.gate = gate
        self.in_put = 0
        self.most = 0

    def put(self, key, data):
        with self.lock:
            self.in_put += 1
            self.most = max(self.most, self.in_put)
        try:
            if self.gate is not None:
                self.gate.wait()
            if key == self.fail_on:
                raise StoreError(f"cannot put {key}: refused (test)")
            with self.lock:
                assert key not in self.sent, f"{key} sent twice"
                self.sent[key] = bytes(data)
        finally:
            with self.lock:
                self.in_put -= 1


@pytest.mark.parametrize("seed", range(8))
def test_every_object_is_sent_exactly_once_by_flush(seed):
    rnd = random.Random(seed)
    threads = rnd.randint(1, 6)
    r = Recorder()
    b = PipelinedBatch(r.put, threads, depth=rnd.randint(1, 5), name="test-put")
    objects = {f"segments/{i:03x}/{i}": rnd.randbytes(rnd.randint(0, 300)) for i in range(rnd.randint(0, 200))}
    for k, v in objects.items():
        b.put(k, v)
    b.flush()
    assert r.sent == objects, f"seed {seed}"
    assert r.most <= threads
    assert _uploaders() == []
    # a batch goes on after a flush (the commit-time check puts again)
    b.put("segments/fff/again", b"x")
    b.flush()
    assert r.sent["segments/fff/again"] == b"x"
    assert _uploaders() == []


def test_the_first_failure_is_raised_and_nothing_queued_after_it_is_sent():
    gate = threading.Event()
    r = Recorder(fail_on="k0", gate=gate)
    b = PipelinedBatch(r.put, 1, depth=4, name="test-put")
    b.put("k0", b"a")           # the one uploader takes it and waits at the gate
    for i in range(1, 4):
        b.put(f"k{i}", b"b")    # queued behind it
    gate.set()
    with pytest.raises(StoreError, match="cannot put k0"):
        b.flush()
    assert r.sent == {}, "objects queued after the failure were sent"
    with pytest.raises(StoreError, match="cannot put k0"):
        b.put("k9", b"c")       # a put after a failure fails at once
    assert _uploaders() == []


def test_a_put_blocked_on_a_full_queue_sees_the_failure():
    gate = threading.Event()
    r = Recorder(fail_on="k0", gate=gate)
    b = PipelinedBatch(r.put, 1, depth=1, name="test-put")
    b.put("k0", b"a")
    b.put("k1", b"b")           # fills the queue
    raised = []

    def third():
        try:
            b.put("k2", b"c")   # blocks: queue full
        except StoreError as e:
            raised.append(e)
    t = threading.Thread(target=third)
    t.start()
    gate.set()
    t.join(30)
    assert not t.is_alive(), "a put blocked on a full queue never woke up"
    b.abort()
    assert "k2" not in r.sent and "k1" not in r.sent
    assert raised or "k2" not in r.sent     # it either failed or was dropped, never sent


def test_memory_is_bounded_by_depth_and_threads():
    gate = threading.Event()
    r = Recorder(gate=gate)
    threads, depth = 2, 3
    b = PipelinedBatch(r.put, threads, depth=depth, name="test-put")
    accepted = []

    def producer():
        for i in range(20):
            b.put(f"k{i}", b"x")
            accepted.append(i)
    t = threading.Thread(target=producer, daemon=True)
    t.start()
    # the producer can hand over at most depth queued + threads in flight, then it blocks
    for _ in range(200):
        if len(accepted) >= depth + threads and r.in_put == threads:
            break
        t.join(0.01)
    t.join(0.2)
    assert len(accepted) <= depth + threads + 1, accepted
    gate.set()
    t.join(30)
    b.flush()
    assert len(r.sent) == 20


def test_abort_drops_the_queue_and_sends_nothing_after_it_returns():
    gate = threading.Event()
    r = Recorder(gate=gate)
    b = PipelinedBatch(r.put, 2, depth=10, name="test-put")
    for i in range(12):
        b.put(f"k{i}", b"x")
    aborter = threading.Thread(target=b.abort)
    aborter.start()
    aborter.join(0.2)
    gate.set()                  # the two in flight finish
    aborter.join(30)
    sent_at_abort = dict(r.sent)
    assert len(sent_at_abort) <= 2, "queued objects were sent after abort()"
    assert _uploaders() == []
    with pytest.raises(RuntimeError, match="after abort"):
        b.put("late", b"y")
    assert r.sent == sent_at_abort


def test_threads_must_be_positive():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        PipelinedBatch(lambda k, d: None, 0)
