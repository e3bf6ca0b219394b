"""Query records in a temporary file: what a :class:`~pyterrier_kdcl.training.groups.GroupSampler` keeps of each
usable query (its qid, query, positives count, candidates' docnos, first-stage scores and, unless streaming, texts),
written once and read back one query at a time, so that the sampler's memory does not grow with the candidates.

The file is unnamed (``tempfile.TemporaryFile``: on Linux it never has a name, elsewhere its name is removed at
once), so it is gone when it is closed, when its sampler is collected, or when the process ends however it ends.
Records are read with ``os.pread``, never mapped: a mapped file's pages count in the process's resident memory once
touched, a read's only while its bytes are in use. A record lives in the operating system's page cache, which the
kernel gives back under pressure; on a ``tmpfs`` temporary directory it lives in memory all the same: point
``TMPDIR`` (or ``spill_dir=``) at a disk.

A record (little-endian)::

    positives, candidates, qid bytes, query bytes  (4 x int32)
    first-stage scores                              (float64 each, when scored)
    docno ends, text ends                           (int64 each: cumulative byte ends; text ends when it keeps texts)
    qid, query, docnos, texts                       (UTF-8, ``surrogatepass``)
"""

from __future__ import annotations

import os
import struct
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLUSH_BYTES = 1 << 22  # records buffered before a write
_HEADER = struct.Struct("<4i")
_ENCODING = ("utf-8", "surrogatepass")


@dataclass(frozen=True)
class QueryRecord:
    """One usable query as the sampler filed it: its positives first among the candidates."""

    qid: str
    query: str
    positives: int
    docnos: Sequence[str]  # decoded when read: a group reads a few of its query's candidates
    texts: Sequence  # str each, or None each when streaming (the text comes from the text source per block)
    scores: np.ndarray | None  # first-stage scores, float64, when the frame had them

    @property
    def size(self) -> int:
        return len(self.docnos)


class QueryRecords:
    """Records appended in order and read back by their number; ``offsets`` (8 bytes a record) is all they hold in
    memory once :meth:`finish` has written the last buffer.

    Example::

        records = QueryRecords(scored=True, texts=False)
        n = records.add("q1", "how to read", 1, ["d1", "d2"], np.array([3.0, 2.0]), None)
        records.finish()
        records.get(n).docnos   # ['d1', 'd2']
        records.close()         # the file is gone
    """

    def __init__(self, scored: bool, texts: bool, directory: str | Path | None = None):
        self.scored, self.keeps_texts = scored, texts
        self.file = tempfile.TemporaryFile(prefix="kdcl-groups-", dir=directory)
        self.offsets = array("q", [0])  # record i spans offsets[i]:offsets[i + 1]
        self._buffer = bytearray()
        self._written = 0  # bytes in the file; the rest of the records are in the buffer

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def add(self, qid: str, query: str, positives: int, docnos: list[str], scores: np.ndarray | None,
            texts: list[str] | None) -> int:
        """Appends one query's record; returns its number."""
        names = [d.encode(*_ENCODING) for d in docnos]
        head = [qid.encode(*_ENCODING), query.encode(*_ENCODING)]
        record = bytearray(_HEADER.pack(positives, len(names), len(head[0]), len(head[1])))
        if self.scored:
            record += np.asarray(scores, dtype="<f8").tobytes()
        record += _ends(names)
        bodies = [names]
        if self.keeps_texts:
            bodies.append([t.encode(*_ENCODING) for t in texts])
            record += _ends(bodies[-1])
        record += b"".join(head)
        for body in bodies:
            record += b"".join(body)
        self._buffer += record
        self.offsets.append(self.offsets[-1] + len(record))
        if len(self._buffer) >= FLUSH_BYTES:
            self._flush()
        return len(self) - 1

    def _flush(self) -> None:
        if self._buffer:
            self.file.seek(0, os.SEEK_END)  # where a read without pread (Windows) may have left the position
            self.file.write(self._buffer)
            self.file.flush()
            self._written += len(self._buffer)
            self._buffer = bytearray()

    def finish(self) -> None:
        """Writes what is buffered: every record is in the file from now on."""
        self._flush()

    def get(self, number: int) -> QueryRecord:
        start, end = self.offsets[number], self.offsets[number + 1]
        if self.file.closed:
            raise ValueError("these groups were closed (their temporary file is gone): build a new GroupSampler")
        if start >= self._written:  # still buffered: only while the records are being written
            data = bytes(self._buffer[start - self._written : end - self._written])
        else:
            data = _pread(self.file, end - start, start)
        positives, size, qid_len, query_len = _HEADER.unpack_from(data)
        at = _HEADER.size
        scores = None
        if self.scored:
            scores = np.frombuffer(data, "<f8", size, at).astype("float64")
            at += 8 * size
        docno_ends = np.frombuffer(data, "<i8", size, at).tolist()
        at += 8 * size
        if self.keeps_texts:
            text_ends = np.frombuffer(data, "<i8", size, at).tolist()
            at += 8 * size
        qid = data[at : at + qid_len].decode(*_ENCODING)
        query = data[at + qid_len : at + qid_len + query_len].decode(*_ENCODING)
        at += qid_len + query_len
        docnos = _Packed(data, at, docno_ends)
        texts = _Packed(data, at + (docno_ends[-1] if size else 0), text_ends) if self.keeps_texts else [None] * size
        return QueryRecord(qid, query, positives, docnos, texts, scores)

    def close(self) -> None:
        """Closes the file, which removes it."""
        self.file.close()

    @property
    def closed(self) -> bool:
        return self.file.closed

    @property
    def file_bytes(self) -> int:
        return self.offsets[-1]

    @property
    def nbytes(self) -> int:
        """Bytes held in memory: the offsets, and any record not yet written."""
        return self.offsets.itemsize * len(self.offsets) + len(self._buffer)


def _ends(encoded: list[bytes]) -> bytes:
    return np.cumsum(np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded)), dtype="<i8").tobytes()


def _pread(file, size: int, offset: int) -> bytes:
    """``size`` bytes at ``offset``, without moving the file's position where the system has ``pread``."""
    if hasattr(os, "pread"):
        return os.pread(file.fileno(), size, offset)
    file.seek(offset)
    return file.read(size)


class _Packed(Sequence):
    """Strings packed back to back from ``at`` in a record's bytes, ``ends`` their cumulative byte ends; each decoded
    when it is read."""

    __slots__ = ("data", "at", "ends")

    def __init__(self, data: bytes, at: int, ends: list[int]):
        self.data, self.at, self.ends = data, at, ends

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self.ends) <= i < len(self.ends):
            raise IndexError(f"index {i} out of range for {len(self.ends)} strings")
        i %= len(self.ends)
        start = self.ends[i - 1] if i else 0
        return self.data[self.at + start : self.at + self.ends[i]].decode(*_ENCODING)
