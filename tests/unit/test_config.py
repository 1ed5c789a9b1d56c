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
