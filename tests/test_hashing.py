"""Tests for instdisc/hashing.py: the file hash equals hashlib's over the whole content, across block boundaries."""
import hashlib

from instdisc.hashing import file_sha256


def test_file_sha256_equals_hashlib(tmp_path):
    for size in (0, 1, (1 << 20) + 3):
        data = bytes(i % 251 for i in range(size))
        p = tmp_path / f"f{size}"
        p.write_bytes(data)
        assert file_sha256(p) == hashlib.sha256(data).hexdigest()
