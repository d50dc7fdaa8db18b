"""Reading back the checksummed log `blklog` (lab/guest/blklog.c) writes in a guest.

Each 512-byte sector of the log describes itself (magic, record number, index in the
record, record length, payload, FNV-1a checksum), so an image can be judged sector by
sector after any kind of death: a sector is *valid* (exactly what blklog wrote there),
*zero* (never written: images start zero-filled), or *torn* (anything else: a sector
written in part, or garbage). `check` says which records are whole.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

SECTOR = 512
MAGIC = b"VFUBLKLG"
_HEAD = struct.Struct("<8sQII")
_MASK64 = (1 << 64) - 1


def fnv1a(data: bytes) -> int:
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return h


def expected_sector(seq: int, index: int, sectors: int) -> bytes:
    """The sector blklog writes at `index` of record `seq` (same generator as blklog.c)."""
    x = (((seq + 1) * 0x9E3779B97F4A7C15) ^ ((index + 1) * 0xBF58476D1CE4E5B9)) & _MASK64
    body = bytearray(_HEAD.pack(MAGIC, seq, index, sectors))
    for _ in range(24, 508):
        x ^= (x << 13) & _MASK64
        x ^= x >> 7
        x ^= (x << 17) & _MASK64
        body.append(x & 0xFF)
    return bytes(body) + struct.pack("<I", fnv1a(body))


@dataclass
class LogCheck:
    """The state of a log image: record numbers by what their sectors hold."""

    sectors_per_record: int
    whole: list[int] = field(default_factory=list)     # every sector valid
    partial: list[int] = field(default_factory=list)   # some valid, the rest zero
    torn: list[tuple[int, int]] = field(default_factory=list)   # (record, sector index)

    @property
    def last_whole_prefix(self) -> int:
        """The highest n such that records 0..n are all whole (-1 if record 0 is not)."""
        n = -1
        for seq in self.whole:
            if seq != n + 1:
                break
            n = seq
        return n

    def summary(self) -> str:
        return (f"{len(self.whole)} whole records (0..{self.last_whole_prefix} complete), "
                f"{len(self.partial)} partial {self.partial[:8]}, "
                f"{len(self.torn)} torn sectors {self.torn[:8]}")


def check(image: Path, sectors_per_record: int, records: int | None = None) -> LogCheck:
    """Judge every record of the log in `image` (up to `records`, else to the end)."""
    result = LogCheck(sectors_per_record)
    record_bytes = sectors_per_record * SECTOR
    zero = bytes(SECTOR)
    with open(image, "rb") as f:
        seq = 0
        while records is None or seq < records:
            data = f.read(record_bytes)
            if len(data) < record_bytes:
                break
            valid = 0
            for index in range(sectors_per_record):
                sector = data[index * SECTOR:(index + 1) * SECTOR]
                if sector == zero:
                    continue
                if sector == expected_sector(seq, index, sectors_per_record):
                    valid += 1
                else:
                    result.torn.append((seq, index))
            if valid == sectors_per_record:
                result.whole.append(seq)
            elif valid:
                result.partial.append(seq)
            seq += 1
    return result
