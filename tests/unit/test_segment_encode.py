"""verify-before-store: a segment whose bytes do not match the digest it was named after is never
stored, and the failure says the data changed in memory (exit 1), not that the store is damaged
(exit 3): the field saw exit 3 for the reader race, which sent operators to check a healthy store."""

import random

import pytest

from ekko_libvirt.format import segment
from ekko_libvirt.errors import EncodeMismatch, IntegrityError


@pytest.mark.parametrize("raw", [random.Random(1).randbytes(256 * 1024),      # stored as is
                                 b"log line 42\n" * 20000],                   # compressed
                         ids=["incompressible", "compressible"])
def test_bytes_that_changed_after_hashing_are_refused_as_an_encode_mismatch(raw):
    stale = segment.digest(raw[:-1] + b"\x00")
    with pytest.raises(EncodeMismatch, match="verify-before-store failed") as e:
        segment.encode(raw, known_digest=stale)
    assert e.value.exit_code == 1
    assert not isinstance(e.value, IntegrityError)
    assert e.value.key == segment.segment_key(stale)


def test_matching_bytes_encode_and_decode():
    raw = b"log line 42\n" * 20000
    enc = segment.encode(raw, known_digest=segment.digest(raw))
    assert segment.decode(enc.blob, enc.digest) == raw
