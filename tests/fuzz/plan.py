"""Pure: what one chain looks like, drawn from its seed.

Everything random about a chain comes from `random.Random(seed)`: the same seed gives the same
configuration, disk, events and guest writes (as long as ekko behaves the same), so a seed
printed by a failure replays it with EKKO_FUZZ_SEED=<seed>.
"""

import random
from dataclasses import asdict, dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

KiB, MiB = 1024, 1024 * 1024

# Events between (or around) backups. `writes` are the guest writes between backups; every other
# kind is drawn 0-2 times per round from those enabled (EKKO_FUZZ_EVENTS).
EVENTS = (
    "writes",            # guest writes between backups: scattered 4 KiB, large, across segment
                         # boundaries, at the disk's tail, zero writes (write_zeroes), rewrites of
                         # unchanged data
    "pause_writes",      # the round's backup is paused (EKKO_TEST_PAUSE) at after-transaction or
                         # during-read; the guest writes; the backup goes on: those writes must not
                         # be in it, and must be in the next one
    "kill_ekko",         # a backup SIGKILLs itself at a random EKKO_TEST_CRASH point; only
                         # after-commit may leave a new backup behind; the guest writes on
    "kill_qemu",         # QEMU SIGKILLed (guest writes flushed first) and started again: the next
                         # backup must be a full that says why
    "restart_qemu",      # QEMU stopped cleanly and started again: the chain goes on
    "disable_bitmap",    # ekko's newest generation disabled through the admin QMP socket, then the
                         # guest writes: the next backup must be a full (its reason: disabled)
    "remove_bitmap",     # ekko's newest generation removed: the next backup must be a full (missing)
    "foreign_bitmap",    # a bitmap that is not ekko's added (`ekko-foo`, with ekko's prefix, or
                         # `other`): it must survive every backup
    "resize",            # block_resize grows the disk by a non-round amount: the next backup must be
                         # a full (size changed); earlier backups keep their size
    "corrupt_segment",   # one bit flipped in a stored segment object: `verify --deep` exits 3 and
                         # names it; a restore naming it exits 3 (or, --allow-damaged, has exactly
                         # that hole); later backups must not name it (self-healing)
    "corrupt_manifest",  # one bit flipped in a committed manifest (the newest, mostly): its restore
                         # exits 3; the next backup is a full that names the damaged manifest
)

# How often each kind is drawn, relative to the others: the ones that break the chain (a full
# follows) are rarer, so that most rounds are incrementals, where missed writes would hide.
WEIGHTS = {"pause_writes": 3, "kill_ekko": 3, "restart_qemu": 1, "foreign_bitmap": 1, "kill_qemu": 1,
           "disable_bitmap": 1, "remove_bitmap": 1, "resize": 1, "corrupt_segment": 1, "corrupt_manifest": 1}


def draw_events(rnd: random.Random, enabled: Sequence[str]) -> List[str]:
    """The events of one round: none, one or two distinct kinds, by WEIGHTS."""
    kinds = [k for k in EVENTS if k in enabled and k in WEIGHTS]
    out: List[str] = []
    for _ in range(rnd.choice((0, 1, 1, 1, 2))):
        left = [k for k in kinds if k not in out]
        if left:
            out.append(rnd.choices(left, [WEIGHTS[k] for k in left])[0])
    return out


CRASH_POINTS = ("after-transaction", "during-read", "during-store", "before-commit", "after-commit")
PAUSE_POINTS = ("after-transaction", "during-read")

SEGMENT_SIZES = (64 * KiB, 128 * KiB, 256 * KiB, 512 * KiB, 1 * MiB, 2 * MiB, 4 * MiB)
REQUEST_SIZES = (4 * KiB, 64 * KiB, 96 * KiB, 256 * KiB, 512 * KiB, 768 * KiB, 1 * MiB, 4 * MiB, 8 * MiB)


def enabled_events(spec: Optional[str]) -> Tuple[str, ...]:
    """EKKO_FUZZ_EVENTS: empty/None = all; 'writes,kill_ekko' = only those; '-resize,-kill_qemu'
    = all but those (both forms may be mixed: the named ones minus the '-' ones)."""
    if not spec or not spec.strip():
        return EVENTS
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n.lstrip("-") not in EVENTS and n != "all"]
    if unknown:
        raise ValueError(f"EKKO_FUZZ_EVENTS: unknown event kind(s) {', '.join(unknown)} "
                         f"(known: {', '.join(EVENTS)})")
    plus = [n for n in names if not n.startswith("-")]
    minus = {n[1:] for n in names if n.startswith("-")}
    base = EVENTS if not plus or "all" in plus else tuple(n for n in EVENTS if n in plus)
    return tuple(n for n in base if n not in minus)


@dataclass(frozen=True)
class Setup:
    seed: int
    segment_size: int
    granularity: int
    request_size: int
    in_flight: int
    workers: int
    compression: bool
    encryption: bool
    store: str              # local | swift
    disk_size: int          # a multiple of 512 (qcow2), often not of the segment size
    max_size: int           # resize events grow the disk up to here
    backups: int            # rounds of the chain: each ends with one backup

    def describe(self) -> str:
        d = asdict(self)
        for k in ("segment_size", "granularity", "request_size", "disk_size", "max_size"):
            d[k] = size_text(d[k])
        return " ".join(f"{k}={v}" for k, v in d.items() if k != "seed")


def size_text(n: int) -> str:
    """Exact and readable: 8MiB+1536, 64KiB, 512."""
    parts = []
    for unit, name in ((MiB, "MiB"), (KiB, "KiB")):
        if n >= unit:
            parts.append(f"{n // unit}{name}")
            n %= unit
    if n or not parts:
        parts.append(str(n))
    return "+".join(parts)


def draw_setup(seed: int, rnd: random.Random) -> Setup:
    seg = rnd.choice(SEGMENT_SIZES)
    gran = min(seg, rnd.choice((4 * KiB, 16 * KiB, 64 * KiB, 64 * KiB, 256 * KiB)))
    # Disk: whole MiBs plus a tail that is rarely a whole segment; sometimes smaller than one segment.
    base = rnd.choice((0, 1, 2, 4, 6, 8, 12, 16, 24, 32)) * MiB
    tail = rnd.choice((0, 512, 1536, 64 * KiB + 512, seg // 2, seg - 512, 512 * rnd.randrange(1, 2 * seg // 512)))
    size = max(512, base + tail)
    return Setup(
        seed=seed, segment_size=seg, granularity=gran, request_size=rnd.choice(REQUEST_SIZES),
        in_flight=rnd.randint(1, 16), workers=rnd.randint(1, 8), compression=rnd.random() < 0.5,
        encryption=rnd.random() < 0.35, store="swift" if rnd.random() < 0.3 else "local",
        disk_size=size, max_size=size + rnd.choice((1, 4, 8)) * MiB, backups=rnd.randint(10, 13))


def config_of(setup: Setup) -> dict:
    """The ekko.yaml keys this setup sets (on top of conftest.make_config)."""
    return {"segment_size": setup.segment_size, "bitmap_granularity": setup.granularity,
            "workers": setup.workers, "read": {"request_size": setup.request_size, "in_flight": setup.in_flight},
            "compression": {"enabled": setup.compression}}


# -- guest writes --------------------------------------------------------------------------------
class Op(NamedTuple):
    kind: str               # write | zero
    offset: int
    length: int
    data: Optional[bytes]   # None for zero
    label: str


def _payload(rnd: random.Random, n: int) -> bytes:
    """Random bytes mostly; sometimes compressible text, or a repeated block (dedup inside a write)."""
    r = rnd.random()
    if r < 0.6:
        return rnd.randbytes(n)
    if r < 0.85:
        line = f"ekko fuzz line {rnd.randrange(1 << 30)} " .encode() * 3 + b"\n"
        return (line * (n // len(line) + 1))[:n]
    block = rnd.randbytes(4 * KiB)
    return (block * (n // len(block) + 1))[:n]


def draw_writes(rnd: random.Random, size: int, seg: int, model: Sequence[int], count: int) -> List[Op]:
    """`count` guest writes on a disk of `size` bytes whose content is `model`."""
    ops = []
    for _ in range(count):
        kind = rnd.choice(("scatter", "large", "boundary", "zero", "tail", "rewrite", "scatter", "boundary"))
        if kind == "scatter":
            for _ in range(rnd.randint(1, 12)):
                off = rnd.randrange(0, max(1, size - 4 * KiB + 1)) & ~511
                n = min(4 * KiB, size - off)
                ops.append(Op("write", off, n, rnd.randbytes(n), f"4KiB@{off}"))
            continue
        if kind == "large":
            n = min(size, rnd.randint(64 * KiB, max(64 * KiB, min(4 * MiB, size // 2))))
            off = rnd.randrange(0, size - n + 1)
        elif kind == "boundary":
            # straddle a segment boundary (or, on a one-segment disk, the end), unaligned
            cuts = max(1, -(-size // seg) - 1)
            edge = min(size, seg * rnd.randint(1, cuts))
            before = rnd.randint(1, min(edge, 96 * KiB))
            n = min(size - edge + before, before + rnd.randint(1, 96 * KiB))
            off = edge - before
        elif kind == "zero":
            n = min(size, rnd.randint(512, 2 * MiB))
            off = rnd.randrange(0, size - n + 1)
            ops.append(Op("zero", off, n, None, f"zero {n}@{off}"))
            continue
        elif kind == "tail":
            n = rnd.randint(1, min(size, 128 * KiB))
            off = size - n
        else:   # rewrite: the same bytes again (dirty in the bitmap, unchanged content)
            n = min(size, rnd.randint(512, 512 * KiB))
            off = rnd.randrange(0, size - n + 1)
            ops.append(Op("write", off, n, bytes(model[off:off + n]), f"rewrite {n}@{off}"))
            continue
        ops.append(Op("write", off, n, _payload(rnd, n), f"{kind} {n}@{off}"))
    return ops


def initial_writes(rnd: random.Random, size: int, seg: int) -> List[Op]:
    """The disk's first content: a few big runs of data, some of it compressible, and holes."""
    ops = []
    for _ in range(rnd.randint(2, 5)):
        n = min(size, rnd.randint(4 * KiB, max(4 * KiB, size // 3)))
        off = rnd.randrange(0, size - n + 1)
        ops.append(Op("write", off, n, _payload(rnd, n), f"fill {n}@{off}"))
    n = rnd.randint(1, min(size, seg + 4 * KiB))
    ops.append(Op("write", size - n, n, rnd.randbytes(n), f"fill-tail {n}@{size - n}"))
    return ops
