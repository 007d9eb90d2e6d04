"""--pack-sequences: which samples share one row of at most --seq-length spliced tokens.

First-fit decreasing over energon's packing buffer (deterministic, so a resumed loader
re-forms the same packs): the longest sample opens a row, each next one goes to the first row
it fits. No sample is dropped; a sample's length never exceeds the capacity (the encoder
truncates or skips to --seq-length)."""

from __future__ import annotations

# samples energon gathers before choosing packs: more gives fuller rows, later first packs
PACKING_BUFFER_SIZE = 64


def sequence_packs(samples: list, lengths: list[int], capacity: int) -> list[list]:
    """Groups of `samples` whose `lengths` sum to at most `capacity`, each group in the
    buffer's order, the groups in the order their first sample arrived."""
    rows: list[list[int]] = []  # sample indices
    room: list[int] = []
    for i in sorted(range(len(samples)), key=lambda i: (-lengths[i], i)):
        row = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return [[samples[i] for i in sorted(row)] for row in sorted(rows, key=min)]
