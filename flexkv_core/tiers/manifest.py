"""The SSD manifest: which block each SSD slot holds, kept on disk so that a restart finds its cache warm.

File format (one file per directory set, in the first directory)::

    b"FKVSSDM1"                                    magic
    frame(ManifestHeader)                          identity fingerprint + geometry
    frame([Put | Forget, ...])  ...                appended log, one frame per batch

    frame := u32 payload length | u64 xxh3_64(payload) | msgpack payload      (little-endian)

A frame is written with one ``os.write`` of the whole frame, so a crash leaves complete frames and at
most one torn frame at the end; replay stops at the first frame whose length or checksum does not
hold. The log only ever says what slots *should* hold: every slot read is verified against the
record's checksum, so a record that outlived its bytes (crash between data write and log append,
lost device cache on power loss) costs a miss, never wrong bytes.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import msgspec
import xxhash

logger = logging.getLogger(__name__)

MAGIC = b"FKVSSDM1"
TMP_SUFFIX = ".tmp."  # a rewrite in progress: <manifest>.tmp.<pid>, renamed over the manifest when complete
_FRAME = struct.Struct("<IQ")  # payload length, xxh3_64 of the payload
#: Records per frame when the whole manifest is rewritten, so no single frame grows without bound.
_RECORDS_PER_FRAME = 4096

_U64_MIN, _U64_MAX = -(1 << 63), (1 << 64) - 1  # what msgpack ints hold: int64 and uint64


@dataclass(frozen=True)
class SlotRecord:
    """What one SSD slot holds, as persisted in the manifest."""

    slot: int
    block_hash: int  # the engine's block hash, stored exactly (signed or unsigned 64-bit)
    parent_hash: int | None
    token_ids: bytes  # the block's tokens as little-endian uint32 (block_size * 4 bytes)
    checksum: int  # xxh3_64 of the slot's bytes as written


def check_hash(name: str, value: object) -> None:
    """Block hashes must fit msgpack's integers (int64 or uint64) to be stored exactly."""
    if isinstance(value, bool) or not isinstance(value, int) or not _U64_MIN <= value <= _U64_MAX:
        raise ValueError(f"{name} must be an int in [-2**63, 2**64), got {value!r}")


class ManifestHeader(msgspec.Struct, frozen=True):
    """What the bytes in the slot files were written for. Any difference means they are unusable."""

    fingerprint: str  # CacheIdentity.fingerprint()
    identity: str  # CacheIdentity.describe(), so a mismatch can be reported in words
    slot_bytes: int
    dirs: list[str]  # real paths, in striping order
    slots_per_file: int
    format_version: int = 1

    def geometry(self) -> str:
        return f"slot_bytes={self.slot_bytes} slots_per_file={self.slots_per_file} dirs={self.dirs}"


class _Put(msgspec.Struct, array_like=True, tag=0):
    slot: int
    block_hash: int
    parent_hash: int | None
    token_ids: bytes
    checksum: int


class _Forget(msgspec.Struct, array_like=True, tag=1):
    slots: list[int]


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(ManifestHeader)
_entries_decoder = msgspec.msgpack.Decoder(list[_Put | _Forget])


def _frame(payload: bytes) -> bytes:
    return _FRAME.pack(len(payload), xxhash.xxh3_64_intdigest(payload)) + payload


def _put_frames(records: Iterable[SlotRecord]) -> Iterator[bytes]:
    chunk: list[_Put] = []
    for r in records:
        chunk.append(_Put(r.slot, r.block_hash, r.parent_hash, r.token_ids, r.checksum))
        if len(chunk) == _RECORDS_PER_FRAME:
            yield _frame(_encoder.encode(chunk))
            chunk = []
    if chunk:
        yield _frame(_encoder.encode(chunk))


class ManifestContents(msgspec.Struct):
    """The result of reading a manifest file."""

    header: ManifestHeader | None  # None: no file, or not a readable manifest
    records: dict[int, SlotRecord]
    ignored_tail_bytes: int = 0  # bytes after the last complete, valid frame


def read_manifest(path: str) -> ManifestContents:
    """Replay a manifest. A missing or unreadable header gives no header; a torn tail is skipped."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return ManifestContents(None, {})
    view = memoryview(data)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        if data:
            logger.warning("SSD manifest %s does not start with %r: ignoring it", path, MAGIC)
        return ManifestContents(None, {})
    pos = len(MAGIC)
    header: ManifestHeader | None = None
    records: dict[int, SlotRecord] = {}
    while pos < len(data):
        if pos + _FRAME.size > len(data):
            break
        length, checksum = _FRAME.unpack_from(view, pos)
        payload = view[pos + _FRAME.size : pos + _FRAME.size + length]
        if len(payload) < length or xxhash.xxh3_64_intdigest(payload) != checksum:
            break
        try:
            if header is None:
                header = _header_decoder.decode(payload)
            else:
                for entry in _entries_decoder.decode(payload):
                    if isinstance(entry, _Put):
                        records[entry.slot] = SlotRecord(
                            entry.slot, entry.block_hash, entry.parent_hash, entry.token_ids, entry.checksum
                        )
                    else:
                        for slot in entry.slots:
                            records.pop(slot, None)
        except msgspec.DecodeError as exc:
            # Checksummed yet undecodable: a different format version wrote it. Stop, like a torn tail.
            logger.warning("SSD manifest %s: undecodable frame at byte %d (%s)", path, pos, exc)
            break
        pos += _FRAME.size + length
    if header is None:
        logger.warning("SSD manifest %s has no readable header: ignoring it", path)
        return ManifestContents(None, {})
    return ManifestContents(header, records, ignored_tail_bytes=len(data) - pos)


class ManifestLog:
    """Appends put/forget frames to a manifest file; rewrites it compactly on demand.

    Callers queue frames (``put``/``forget``) in the order their state changes happen, typically under
    their own lock, and ``flush`` them to the file later from any thread: queue order is file order.
    """

    def __init__(self, path: str, header: ManifestHeader, records: Iterable[SlotRecord]) -> None:
        self.path = path
        self._header = header
        self._pending: list[bytes] = []
        self._pending_lock = threading.Lock()
        self._file_lock = threading.Lock()  # serialises flush/sync/rewrite, keeping frames in order
        self._fd = -1
        self.appended_bytes = 0  # log bytes written since the last rewrite
        self.rewrite(lambda: records)

    def put(self, records: Sequence[SlotRecord]) -> None:
        if records:
            frames = list(_put_frames(records))
            with self._pending_lock:
                self._pending.extend(frames)

    def forget(self, slots: Sequence[int]) -> None:
        if slots:
            frame = _frame(_encoder.encode([_Forget(list(slots))]))
            with self._pending_lock:
                self._pending.append(frame)

    def drop_pending(self) -> None:
        """Discard queued frames: for a ``rewrite`` snapshot that already includes their effect."""
        with self._pending_lock:
            self._pending.clear()

    def flush(self) -> None:
        """Hand the queued frames to the OS (survives a process crash; not yet a power loss)."""
        with self._file_lock:
            self._flush_locked()

    def sync(self) -> None:
        """Flush, then make the manifest durable."""
        with self._file_lock:
            self._flush_locked()
            if self._fd >= 0:
                os.fsync(self._fd)

    def rewrite(self, snapshot: Callable[[], Iterable[SlotRecord]]) -> None:
        """Replace the file by header + the records ``snapshot()`` returns (compaction), atomically.

        ``snapshot`` runs with appends held off; it must return the current records and call
        ``drop_pending()`` under the same lock that orders its state changes, so frames queued before it
        (already in the snapshot) are dropped and frames queued after it are appended to the new file.
        """
        with self._file_lock:
            records = snapshot()
            tmp = f"{self.path}{TMP_SUFFIX}{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                buf = bytearray(MAGIC + _frame(_encoder.encode(self._header)))
                for frame in _put_frames(records):
                    buf += frame
                    if len(buf) >= 8 << 20:
                        _write_all(fd, buf)
                        buf.clear()
                _write_all(fd, buf)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
            os.close(fd)
            os.replace(tmp, self.path)
            _fsync_dir(os.path.dirname(self.path))
            if self._fd >= 0:
                os.close(self._fd)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            self.appended_bytes = 0

    def close(self) -> None:
        with self._file_lock:
            if self._fd >= 0:
                self._flush_locked()
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1

    def _flush_locked(self) -> None:
        with self._pending_lock:
            frames, self._pending = self._pending, []
        if frames and self._fd >= 0:
            # One write per flush: frames are never interleaved, and a crash tears at most the last one.
            data = b"".join(frames)
            _write_all(self._fd, data)
            self.appended_bytes += len(data)


def _write_all(fd: int, data: bytes | bytearray) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(path: str) -> None:
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
