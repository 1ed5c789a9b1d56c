"""lifecycle/sync.py on memory and local stores with synthetic chains (every manifest restored
from the destination and compared with the bytes it was made of), encrypted stores copied
sealed, damaged and missing source segments, faults injected at a random put (seed printed)
and the sync resumed, and the listing path of the destination check."""

import datetime
import os
import random

import pytest

from ekko_libvirt.errors import IntegrityError, StoreError
from ekko_libvirt.format import crypto, manifest as mf, segment
from ekko_libvirt.lifecycle.sync import Syncer, candidates, to_copy
from ekko_libvirt.restore.disk import restore
from ekko_libvirt.store import catalog
from ekko_libvirt.store.local import LocalStore
from ekko_libvirt.store.memory import MemoryStore
from ekko_libvirt.store.sealed import SealedStore

SEG = 4096
KEY = bytes(range(32))


class Counting(MemoryStore):
    """A memory store that counts puts per key and exists() calls, and may prefer listing."""

    def __init__(self, listing=False):
        super().__init__()
        self.puts, self.exists_calls, self.listing = {}, 0, listing

    def put(self, key, data):
        self.puts[key] = self.puts.get(key, 0) + 1
        super().put(key, data)

    def exists(self, key):
        self.exists_calls += 1
        return super().exists(key)

    def prefers_listing(self, checks):
        return self.listing


class FailAt(Counting):
    """Raises StoreError at its n-th put (an interrupted sync: the network, the process)."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def put(self, key, data):
        if sum(self.puts.values()) + 1 == self.n:
            raise StoreError(f"injected fault at put {self.n} ({key})")
        super().put(key, data)


def disk_versions(rnd, n_segments, n_versions):
    """A disk's contents at each backup: a few random segments change (or become zero) each time."""
    disk = [rnd.randbytes(SEG) if rnd.random() < 0.7 else bytes(SEG) for _ in range(n_segments)]
    disk[-1] = disk[-1][:SEG // 2]              # a short last segment
    out = [list(disk)]
    for _ in range(n_versions - 1):
        for i in rnd.sample(range(n_segments), 3):
            size = len(disk[i])
            disk[i] = rnd.randbytes(size) if rnd.random() < 0.8 else bytes(size)
        disk[rnd.randrange(n_segments)] = disk[0]         # a repeated segment (dedup)
        out.append(list(disk))
    return out


_CLOCK = [datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc)]


def next_id():
    """Backup ids one second apart: ids made within one millisecond would not sort by time."""
    _CLOCK[0] += datetime.timedelta(seconds=1)
    return catalog.new_backup_id(_CLOCK[0])


def put_chain(store, target, versions, parent=None):
    """A full (or, after `parent`, an incremental) and incrementals, segments stored through the
    store's codec."""
    keys = []
    for v in versions:
        table = mf.SegmentTable(len(v))
        for i, raw in enumerate(v):
            if raw == bytes(len(raw)):
                continue
            enc = segment.encode(raw, codec=store.codec)
            store.put(enc.key, enc.blob)
            table.set_data(i, enc.digest)
        size = sum(len(x) for x in v)
        m = mf.Manifest(next_id(), target, size, SEG, table, kind="incremental" if parent else "full",
                        parent=parent, hash=store.codec.naming, encryption=store.codec.describe())
        keys.append(catalog.commit(store, m))
        parent = m.backup_id
    return keys


def restored(store, key, tmp_path):
    out = os.path.join(str(tmp_path), key.replace("/", "_") + ".raw")
    restore(store, mf.decode(store.get(key), key), out)
    with open(out, "rb") as f:
        return f.read()


def consistent(store):
    """Every manifest at the destination has every segment it names (by listing: exists() is counted)."""
    there = set(store.list("segments/"))
    for key in catalog.keys(store):
        m = mf.decode(store.get(key), key)
        for d in m.table.unique_digests():
            assert segment.segment_key(d) in there, f"{key} committed without {d.hex()}"


def test_pure_decisions():
    a, b, c = "manifests/t/20260101T000000000Z-aaaaaa", "manifests/t/20260102T000000000Z-bbbbbb", \
        "manifests/u/20260101T120000000Z-cccccc"
    assert to_copy([c, b, a], []) == [a, b, c]                   # target by target, each oldest first
    assert to_copy([b, a, c], [a]) == [b, c]
    assert to_copy([a], [a, b]) == []
    assert candidates({b"1", b"2", b"3"}, {b"2"}, {b"3"}) == {b"1"}
    assert candidates({b"1", b"2"}, None, set()) == {b"1", b"2"}


@pytest.mark.parametrize("dest_kind", ["local", "memory", "memory-listing"])
def test_chains_copied_and_restored_from_the_destination(dest_kind, tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rnd = random.Random(seed)
    src = LocalStore(str(tmp_path / "src"))
    chains = {t: disk_versions(rnd, 13, 4) for t in ("vm1.vda", "vm1.vdb")}
    keys = {t: put_chain(src, t, v[:2]) for t, v in chains.items()}
    dst = LocalStore(str(tmp_path / "dst")) if dest_kind == "local" else Counting(listing=dest_kind.endswith("listing"))
    rep = Syncer(src, src, dst, workers=3).run()
    assert rep.ok and sorted(rep.copied) == sorted(k for ks in keys.values() for k in ks)
    consistent(dst)
    # the second sync: only the new backups, only their new segments
    for t, v in chains.items():
        keys[t] += put_chain(src, t, v[2:], parent=keys[t][-1].rsplit("/", 1)[1])
    before = set(dst.list("segments/"))
    rep2 = Syncer(src, src, dst, workers=3).run()
    assert rep2.ok and rep2.already == 4 and len(rep2.copied) == 4
    new = set(dst.list("segments/")) - before
    assert rep2.segments_copied == len(new) <= 2 * 2 * 4          # 2 targets x 2 versions x (3 changed + 1)
    assert rep2.segments_checked <= 2 * 2 * 4                      # in proportion to what changed, not the disks
    if isinstance(dst, Counting):
        assert max(dst.puts.values()) == 1                         # nothing put twice
        assert (dst.exists_calls == len(rep.copied) + len(rep2.copied)) == dst.listing   # per manifest: commit
    consistent(dst)
    for t, ks in keys.items():
        for k, v in zip(ks, chains[t]):
            assert restored(dst, k, tmp_path) == b"".join(v), (seed, k)
    assert Syncer(src, src, dst).run().copied == []                # nothing left to do


def test_a_damaged_source_segment_is_reported_and_never_copied(tmp_path):
    rnd = random.Random(7)
    src, dst = MemoryStore(), Counting()
    v = disk_versions(rnd, 8, 3)
    keys = put_chain(src, "t", v)
    m2 = mf.decode(src.get(keys[1]), keys[1])
    m1 = mf.decode(src.get(keys[0]), keys[0])
    only2 = sorted(m2.table.unique_digests() - m1.table.unique_digests())
    bad = segment.segment_key(only2[0])
    original = src.get(bad)
    src.put(bad, original[:-1] + bytes([original[-1] ^ 0x10]))
    m3 = mf.decode(src.get(keys[2]), keys[2])
    rep = Syncer(src, src, dst).run()
    assert rep.copied == [keys[0]] + ([keys[2]] if only2[0] not in m3.table.unique_digests() else [])
    assert [f.key for f in rep.failed][0] == keys[1]
    assert [k for k, _ in rep.failed[0].segments] == [bad] and bad in rep.failed[0].segments[0][1]
    assert bad in rep.damaged and not dst.exists(bad) and not dst.exists(keys[1])
    consistent(dst)
    src.put(bad, original)
    rep2 = Syncer(src, src, dst).run()            # repaired at the source: the rest follows
    assert rep2.ok and keys[1] in rep2.copied
    consistent(dst)
    assert restored(dst, keys[1], tmp_path) == b"".join(v[1])


def test_a_missing_source_segment_and_an_unreadable_manifest(tmp_path):
    src, dst = MemoryStore(), MemoryStore()
    keys = put_chain(src, "t", disk_versions(random.Random(3), 6, 2))
    gone = segment.segment_key(sorted(mf.decode(src.get(keys[0]), keys[0]).table.unique_digests())[0])
    src.delete(gone)
    blob = bytearray(src.get(keys[1]))
    blob[20] ^= 1
    src.put(keys[1], bytes(blob))
    rep = Syncer(src, src, dst).run()
    assert rep.copied == [] and [f.key for f in rep.failed] == keys
    assert rep.failed[0].segments == [(gone, "missing at the source")]
    assert "cannot be read" in rep.failed[1].problem
    assert catalog.keys(dst) == []


def test_encrypted_store_copied_sealed(tmp_path):
    src_raw = MemoryStore()
    src = SealedStore(src_raw, lambda: crypto.SealedCodec(KEY, "/k/default.key"))
    v = disk_versions(random.Random(5), 9, 3)
    keys = put_chain(src, "vm.vda", v)
    dst = MemoryStore()
    rep = Syncer(src, src_raw, dst, workers=2).run()
    assert rep.ok and rep.copied == keys
    for k in dst.list(""):
        assert dst.get(k) == src_raw.get(k)                       # the very bytes: sealed
        assert dst.get(k)[:4] == b"EKE1"
    reader = SealedStore(dst, lambda: crypto.SealedCodec(KEY, "/k/default.key"))   # who holds the key
    for k, raw in zip(keys, v):
        assert restored(reader, k, tmp_path) == b"".join(raw)
    # a segment replaced at the source by one sealed under another key is damage, not copied
    other = SealedStore(MemoryStore(), lambda: crypto.SealedCodec(bytes(32), "/k/other.key"))
    more = put_chain(src, "vm.vdb", disk_versions(random.Random(99), 5, 1))       # new content
    victim = segment.segment_key(sorted(mf.decode(src.get(more[0]), more[0]).table.unique_digests())[0])
    other.put(victim, b"x" * 100)
    src_raw.put(victim, other.inner.get(victim))
    rep = Syncer(src, src_raw, dst).run()
    assert [f.key for f in rep.failed] == more and not dst.exists(more[0]) and not dst.exists(victim)
    assert "sealed with another key" in rep.failed[0].segments[0][1]
    with pytest.raises(IntegrityError, match="sealed with another key"):
        src.get(victim)                                           # what a restore at the source says too


def test_interrupted_at_a_random_put_then_resumed(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    rnd = random.Random(seed)
    src = MemoryStore()
    keys = [k for t in ("a.vda", "b.vda") for k in put_chain(src, t, disk_versions(rnd, 10, 3))]
    total = Counting()
    Syncer(src, src, total).run()
    n = rnd.randint(1, sum(total.puts.values()))
    dst = FailAt(n)
    with pytest.raises(StoreError, match="injected fault"):
        Syncer(src, src, dst, workers=rnd.randint(1, 4)).run()
    consistent(dst)                                                # whatever was committed is whole
    first = dict(dst.puts)
    dst.n = 0                                                      # the fault is gone
    rep = Syncer(src, src, dst, workers=rnd.randint(1, 4)).run()
    assert rep.ok and sorted(catalog.keys(dst)) == sorted(keys), seed
    assert max(dst.puts.values()) == 1, (seed, [k for k, c in dst.puts.items() if c > 1])   # none copied twice
    assert set(dst.puts) == set(total.puts), seed
    assert rep.segments_copied == sum(1 for k in dst.puts if k.startswith("segments/") and k not in first)
    consistent(dst)


def test_a_damaged_segment_two_backups_share_fails_both():
    rnd = random.Random(11)
    src, dst = MemoryStore(), MemoryStore()
    v = disk_versions(rnd, 6, 1)
    a = put_chain(src, "a.vda", v)                  # the same content on two disks: one segment each
    b = put_chain(src, "b.vda", v)
    shared = sorted(mf.decode(src.get(a[0]), a[0]).table.unique_digests())[0]
    key = segment.segment_key(shared)
    blob = src.get(key)
    src.put(key, blob[:-1] + bytes([blob[-1] ^ 1]))
    rep = Syncer(src, src, dst).run()
    assert sorted(f.key for f in rep.failed) == sorted(a + b) and rep.copied == []
    assert catalog.keys(dst) == [] and not dst.exists(key)


def _cli(tmp_path, capsys, cfg, *argv):
    import yaml
    from ekko_libvirt.cli import main
    path = tmp_path / "ekko.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(["-c", str(path), *argv])
    return code, capsys.readouterr()


def test_cli_refuses_bad_store_names_and_one_store_twice(tmp_path, capsys):
    base = {"store": {"type": "local", "path": str(tmp_path / "a")}, "state_dir": str(tmp_path / "st"),
            "stores": {"b": {"type": "local", "path": str(tmp_path / "b")},
                       "same": {"type": "local", "path": str(tmp_path / "a")}}}
    code, out = _cli(tmp_path, capsys, base, "sync", "default", "nowhere")
    assert code == 2 and "no store named 'nowhere' in the config (known: default, b, same" in out.err
    code, out = _cli(tmp_path, capsys, base, "sync", "b", "b")
    assert code == 2 and "source and destination are the same store ('b')" in out.err
    code, out = _cli(tmp_path, capsys, base, "sync", "default", "same")
    assert code == 2 and "configured the same: one store" in out.err
    code, out = _cli(tmp_path, capsys, dict(base, stores={"b": {"type": "ftp"}}), "sync", "default", "b")
    assert code == 2 and "config: stores.b.type: unknown store type 'ftp'" in out.err
    code, out = _cli(tmp_path, capsys, dict(base, stores={"default": {"type": "local"}}), "list")
    assert code == 2 and "stores.default: 'default' is the name of `store:`" in out.err
    code, out = _cli(tmp_path, capsys, dict(base, stores={"b": {"type": "local", "path": "x", "pth": 1}}), "list")
    assert code == 2 and "config: stores.b.pth: unknown key for a local store" in out.err


def test_cli_sync_json_and_exit_3_on_damage(tmp_path, capsys):
    import json
    src = LocalStore(str(tmp_path / "a"))
    keys = put_chain(src, "vm.vda", disk_versions(random.Random(2), 5, 2))
    cfg = {"store": {"type": "local", "path": str(tmp_path / "a")}, "state_dir": str(tmp_path / "st"),
           "stores": {"b": {"type": "local", "path": str(tmp_path / "b")}}}
    code, out = _cli(tmp_path, capsys, cfg, "sync", "default", "b", "--json")
    rep = json.loads(out.out)
    assert code == 0 and rep["ok"] and rep["namespaces"][0]["copied"] == [k.split("/", 1)[1] for k in keys]
    more = put_chain(src, "vm.vdb", disk_versions(random.Random(4), 3, 1))
    bad = segment.segment_key(sorted(mf.decode(src.get(more[0]), more[0]).table.unique_digests())[0])
    blob = src.get(bad)
    src.put(bad, blob[:-1] + bytes([blob[-1] ^ 1]))
    code, out = _cli(tmp_path, capsys, cfg, "sync", "default", "b")
    assert code == 3 and f"NOT copied {more[0].split('/', 1)[1]}" in out.out and bad in out.out
    assert "0 backup(s) copied, 2 already there, 1 NOT copied" in out.out


def test_a_bounded_memory_of_what_is_there_changes_nothing_but_questions(monkeypatch):
    from ekko_libvirt.lifecycle import sync
    src = MemoryStore()
    rnd = random.Random(21)
    keys = [k for t in ("a.vda", "b.vda", "c.vda") for k in put_chain(src, t, disk_versions(rnd, 8, 3))]
    wide, narrow = Counting(), Counting()
    Syncer(src, src, wide).run()
    monkeypatch.setattr(sync, "DONE_MAX", 2)
    rep = Syncer(src, src, narrow).run()
    assert rep.ok and sorted(catalog.keys(narrow)) == sorted(keys) and narrow._objects == wide._objects
    assert max(narrow.puts.values()) == 1 and narrow.exists_calls >= wide.exists_calls
    consistent(narrow)
