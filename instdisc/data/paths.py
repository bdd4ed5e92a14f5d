"""A compact, read-only list of file paths. Covered by tests/test_data_folder.py.

A Python list of a million ``str`` costs ~100 MB, and DataLoader workers forked from the main process copy the pages
of every object whose reference count they touch. ``PathTable`` keeps the names as one ``uint8`` buffer plus int64
offsets (two numpy arrays, never touched by refcounting), relative to a common root, and builds each ``str`` on demand.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Sequence

import numpy as np

__all__ = ["PathTable"]


class PathTable(Sequence[str]):
    """``table[i] -> root/name_i`` (or ``name_i`` when root is ""); behaves like a read-only ``list[str]``."""

    def __init__(self, root: str, blob: np.ndarray, offsets: np.ndarray):
        if blob.dtype != np.uint8 or blob.ndim != 1:
            raise ValueError(f"blob must be 1-d uint8, got {blob.dtype} {blob.shape}")
        if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) == 0:
            raise ValueError(f"offsets must be non-empty 1-d int64, got {offsets.dtype} {offsets.shape}")
        self.root = root
        self.blob = blob  # (total_bytes,) uint8, names encoded with os.fsencode
        self.offsets = offsets  # (n + 1,) int64, name i is blob[offsets[i]:offsets[i+1]]
        self._prefix = root.rstrip(os.sep) + os.sep if root else ""

    @classmethod
    def from_names(cls, root: str, names: Iterable[str]) -> "PathTable":
        names = list(names)
        if not names:
            return cls(root, np.zeros(0, dtype=np.uint8), np.zeros(1, dtype=np.int64))
        # one encode of all names joined by NUL (which no path contains), then split with numpy
        joined = np.frombuffer(os.fsencode("\0".join(names)) + b"\0", dtype=np.uint8)
        ends = np.flatnonzero(joined == 0)  # (n,) separator positions
        if len(ends) != len(names):
            raise ValueError("a path name contains a NUL byte")
        lengths = np.diff(ends, prepend=-1) - 1  # (n,)
        offsets = np.zeros(len(names) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(root, joined[joined != 0], offsets)

    def name(self, i: int) -> str:
        """The stored name (relative to ``root``)."""
        return os.fsdecode(self.blob[self.offsets[i]:self.offsets[i + 1]].tobytes())

    def names(self) -> list[str]:
        return [self.name(i) for i in range(len(self))]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"path index {i} out of range for {n} paths")
        return self._prefix + self.name(i)

    def __iter__(self) -> Iterator[str]:
        for i in range(len(self)):
            yield self._prefix + self.name(i)

    def __eq__(self, other) -> bool:
        if isinstance(other, Sequence) and not isinstance(other, str):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __repr__(self) -> str:
        return f"PathTable(root={self.root!r}, n={len(self)})"

    def subset(self, idx: Sequence[int] | np.ndarray) -> "PathTable":
        """A new table holding rows ``idx`` (in that order)."""
        idx = np.asarray(idx, dtype=np.int64)
        starts, ends = self.offsets[idx], self.offsets[idx + 1]
        lengths = ends - starts
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if len(idx) == 0:
            return PathTable(self.root, np.zeros(0, dtype=np.uint8), offsets)
        # gather every byte of the chosen names in one vectorised step
        pos = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
        return PathTable(self.root, self.blob[pos], offsets)


def as_path_table(paths: Sequence[str] | PathTable) -> PathTable:
    return paths if isinstance(paths, PathTable) else PathTable.from_names("", paths)
