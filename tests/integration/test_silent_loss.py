"""The loss paths a new user found in an hour: each test fails on the code before its fix.

Every test compares what a committed backup restores with the disk as it was at the backup's
instant (the QemuDisk's model), not with what the backup says about itself.
"""

import random

import pytest

from tests.integration.test_backup_qmp import ours, restore_equals

KiB, MiB = 1024, 1024 * 1024


@pytest.mark.parametrize("in_flight,request_size", [(1, "64KiB"), (1, "256KiB"), (2, "96KiB")])
def test_reads_split_into_several_requests_with_few_in_flight_restore_exact(in_flight, request_size, qdisk,
                                                                           ekko_for, workdir):
    """Loss path 1: the reader handed a segment to a worker while its later reads were still to
    be issued, so a stale buffer was hashed and stored (or matched as 'reused'). Random data and
    a request size below the segment size make every segment take several reads."""
    rnd = random.Random(13)
    disk = qdisk(24 * MiB + 3 * 512)        # a short last segment too
    ekko = ekko_for(disk, segment_size="256KiB")
    ekko.cfg["read"] = {"in_flight": in_flight, "request_size": request_size}
    ekko.cfg["workers"] = 3
    ekko.write_config()
    disk.write(0, rnd.randbytes(24 * MiB + 3 * 512))
    first = ekko.backup()
    assert first["kind"] == "full"
    assert restore_equals(ekko, first["backup_id"], disk.snapshot(), workdir)
    for _ in range(40):
        disk.write(rnd.randrange(0, 24 * MiB), rnd.randbytes(rnd.randrange(1, 200 * KiB)))
    second = ekko.backup()
    assert second["kind"] == "incremental"
    assert restore_equals(ekko, second["backup_id"], disk.snapshot(), workdir)
    assert ours(disk) == [second["generation"]["bitmap"]]
