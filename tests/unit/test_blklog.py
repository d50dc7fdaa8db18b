"""lab.blklog: the host's reading of the guest's checksummed log, sector by sector."""

from vfiouser_iommu.lab.blklog import SECTOR, check, expected_sector, fnv1a


def _image(tmp_path, records, sectors=4, extra=b""):
    data = b"".join(expected_sector(seq, i, sectors) for seq in range(records)
                    for i in range(sectors))
    path = tmp_path / "disk.img"
    path.write_bytes(data + extra + bytes(8 * sectors * SECTOR))
    return path


def test_sectors_check_themselves():
    s = expected_sector(7, 3, 8)
    assert len(s) == SECTOR and s[:8] == b"VFUBLKLG"
    assert int.from_bytes(s[508:], "little") == fnv1a(s[:508])
    assert expected_sector(7, 3, 8) != expected_sector(7, 4, 8)


def test_whole_partial_and_torn_records(tmp_path):
    path = _image(tmp_path, 5)
    result = check(path, 4)
    assert result.whole == [0, 1, 2, 3, 4] and not result.partial and not result.torn
    assert result.last_whole_prefix == 4
    raw = bytearray(path.read_bytes())
    raw[2 * 4 * SECTOR + SECTOR:2 * 4 * SECTOR + 2 * SECTOR] = bytes(SECTOR)   # record 2 partial
    raw[3 * 4 * SECTOR + 100] ^= 0xFF                                           # record 3 torn
    path.write_bytes(raw)
    result = check(path, 4)
    assert result.whole == [0, 1, 4] and result.partial == [2, 3]
    assert result.torn == [(3, 0)]
    assert result.last_whole_prefix == 1
