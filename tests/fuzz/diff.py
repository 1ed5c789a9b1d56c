"""Pure: where a restored image differs from the model, said so that a reader can tell a missed
write (the segment holds an earlier instant's content) from garbage or a lost segment (zeros)."""

from typing import List, Sequence, Tuple

MAX_LINES = 8


def describe(got: bytes, expected: bytes, seg: int, instants: Sequence[Tuple[str, bytes]] = ()) -> str:
    """`instants`: (label, image) of other instants (earlier backups, the disk now), to name the
    content a wrong segment holds instead."""
    lines: List[str] = []
    if len(got) != len(expected):
        lines.append(f"size {len(got)}, expected {len(expected)}")
    n = min(len(got), len(expected))
    wrong = [i for i in range(-(-n // seg)) if got[i * seg:(i + 1) * seg] != expected[i * seg:(i + 1) * seg]]
    if wrong:
        lines.append(f"{len(wrong)} of {-(-n // seg)} segment(s) of {seg} bytes differ")
    for i in wrong[:MAX_LINES]:
        start, end = i * seg, min(n, (i + 1) * seg)
        a, b = got[start:end], expected[start:end]
        first = next(k for k in range(len(a)) if a[k] != b[k])
        last = next(k for k in reversed(range(len(a))) if a[k] != b[k])
        if not any(a):
            what = "zeros"
        else:
            same = [label for label, img in instants if img[start:end] == a]
            what = f"the content of {', '.join(same)}" if same else "bytes of no known instant"
        lines.append(f"  segment {i} [{start}, {end}): bytes {start + first}..{start + last} differ; "
                     f"restored holds {what}")
    if len(wrong) > MAX_LINES:
        lines.append(f"  ... and {len(wrong) - MAX_LINES} more")
    return "\n".join(lines) or "identical"
