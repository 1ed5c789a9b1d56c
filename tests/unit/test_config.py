import os
import pytest

from ekko_libvirt import config, units
from ekko_libvirt.errors import ConfigError


def test_defaults_and_sizes():
    c = config.build({"targets": {"vm1-vda": {"qmp_socket": "/run/q.sock", "node": "disk0"}}})
    assert c.segment_size == units.DEFAULT_SEGMENT_SIZE and c.store.type == "local"
    assert c.target("vm1-vda").engine == "qmp" and c.target("nope") is None
    assert config.build({"segment_size": "1MiB"}).segment_size == units.MiB
    assert units.parse_size("64k") == 65536 and units.parse_size(4096) == 4096


@pytest.mark.parametrize("raw, key", [
    ([], "(top)"),
    ({"segment_size": "5MiB"}, "segment_size"),
    ({"bitmap_granularity": "8MiB"}, "bitmap_granularity"),
    ({"compression": {"level": 40}}, "compression.level"),
    ({"compression": {"algo": "lz4"}}, "compression.algo"),
    ({"read": {"in_flight": "many"}}, "read.in_flight"),
    ({"targets": {"bad name": {}}}, "targets.bad name"),
    ({"targets": {"t": {"engine": "qmp", "node": "d"}}}, "targets.t.qmp_socket"),
    ({"targets": {"t": {"qmp_socket": "/s", "node": "d", "nod": 1}}}, "targets.t.nod"),
    ({"store": {"type": "local", "path": ""}}, "store.path"),
    ({"run_dir": "/" + "x" * 120}, "run_dir"),
])
def test_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        config.build(raw)
    assert e.value.key == key and key in str(e.value)


@pytest.mark.parametrize("raw, key", [
    ({"compression": False}, "compression"),           # not silently "the defaults, compression on"
    ({"compression": [1]}, "compression"),
    ({"read": "fast"}, "read"),
    ({"workers": [1]}, "workers"),
    ({"workers": 10 ** 40}, "workers"),
    ({"segment_size": [1]}, "segment_size"),
    ({"segment_size": {"a": 1}}, "segment_size"),
    ({"segment_size": "1" * 100}, "segment_size"),
    ({"segment_size": 1.5}, "segment_size"),
    ({"scratch_reserve": None}, "scratch_reserve"),
    ({"state_dir": "/var/lib/\x00ekko"}, "state_dir"),
    ({"state_dir": ["/var"]}, "state_dir"),
    ({"qmp_timeout": "30"}, "qmp_timeout"),
    ({"targets": ["t"]}, "targets"),
    ({"targets": {"t": {"engine": ["qmp"]}}}, "targets.t.engine"),
    ({"targets": {"t": {"qmp_socket": "/s", "node": "d", "bitmap_prefix": 5}}}, "targets.t.bitmap_prefix"),
    ({"targets": {"a\nb": {}}}, "targets.'a\\nb'"),
    ({"colour\nred": 1}, "'colour\\nred'"),
    ({"encryption": ["on"]}, "encryption"),
    ({"encryption": {"key_file": ["/k"]}}, "encryption.key_file"),
    ({"libvirt": ["qemu:///system"]}, "libvirt"),                     # checked when loaded
    ({"libvirt": {"uri": 5}}, "libvirt.uri"),
    ({"store": {"type": ["local"]}}, "store.type"),
    ({"store": "local"}, "store"),
])
def test_every_shape_is_a_config_error_in_one_short_line(raw, key):
    with pytest.raises(ConfigError) as e:
        config.build(raw)
    assert e.value.key == key, str(e.value)
    assert "\n" not in str(e.value) and len(str(e.value)) < 300


def _load_text(tmp_path, text):
    path = tmp_path / "ekko.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert e.value.key == "(file)" and "\n" not in str(e.value) and len(str(e.value)) < 400, str(e.value)
    return str(e.value)


@pytest.mark.parametrize("text, words", [
    ("workers: " + "9" * 5000, "4300 digits"),           # PyYAML's int() refuses it: a ValueError
    ("workers: " + "[" * 800 + "]" * 800, "nests too deeply"),
    ("state_dir: 2001-13-01\n", "a value cannot be read (ValueError)"),
    ("a: 1\n---\nb: 2\n", "not valid YAML"),
    (b"store: \xff\xfe\n", "not UTF-8"),
    ("# " + "x" * (2 << 20), "larger than"),
    ("store: {type: swift, key: !!python/object:os.system x}", "not valid YAML"),
    ("store: {type: swift, key: !!int }", "(IndexError)"),
    ("store: {type: swift, key: !!bool s3cr3t}", "(KeyError)"),
    ("store: {type: swift, key: !!float s3cr3t}", "(ValueError)"),
    ("store: {type: swift, key: !!timestamp s3cr3t}", "(AttributeError)"),
], ids=["huge-int", "deep", "bad-date", "two-documents", "not-utf8", "huge-file", "python-tag", "empty-int-tag",
        "bool-tag", "float-tag", "timestamp-tag"])
def test_a_file_that_is_no_config(tmp_path, text, words):
    msg = _load_text(tmp_path, text)
    assert words in msg and "s3cr3t" not in msg, msg


def test_a_yaml_error_shows_no_line_of_the_file(tmp_path):
    msg = _load_text(tmp_path, 'store:\n  type: swift\n  key: "s3cr3t-V4LUE\\q"\n')
    assert "line 3" in msg and "s3cr3t" not in msg


def test_an_alias_bomb_is_shown_short(tmp_path):
    """4**12 leaves behind 12 anchors: an error quoting the value in full would be megabytes."""
    lines = ["workers:", "  - &a0 [x, x, x, x]"]
    lines += [f"  - &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 12)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert e.value.key == "workers" and len(str(e.value)) < 300


@pytest.mark.parametrize("size", [0, 1, 511, "33MiB"])
def test_a_request_size_outside_what_nbd_allows_is_refused(size):
    """request_size 0 made the reader split every read into 0-byte requests for ever."""
    with pytest.raises(ConfigError, match=r"read.request_size: must be from 512 bytes to 32MiB"):
        config.build({"read": {"request_size": size}})


def test_workers_default_to_the_cores_ekko_may_run_on(monkeypatch):
    from ekko_libvirt import units
    for cores, expected in ((1, 4), (2, 4), (6, 6), (32, 32), (200, 64)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert units.default_workers() == expected, cores
