"""BlobReader against a scripted source: what real registries rarely do on demand (ignore
Range, answer the wrong Content-Range, break every time), and the hash bookkeeping."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest

from syncer.copy.blobstream import BlobReader
from syncer.registry.errors import IntegrityError, TransportError
from syncer.registry.retry import RetryPolicy
from syncer.registry.uploads import _held_bytes
from syncer.registry.wire import WireError

BLOB = bytes(range(256)) * 40  # 10 240 bytes
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
FAST = RetryPolicy(max_retries=5, base=0.0, jitter=False)


@dataclass
class _Raw:
    body: bytes
    cut_after: int | None

    def stream(self, amount: int):
        sent = 0
        while sent < len(self.body):
            if self.cut_after is not None and sent >= self.cut_after:
                raise WireError("cut", "body cut short")
            end = min(sent + amount, len(self.body))
            if self.cut_after is not None:
                end = min(end, self.cut_after)
            yield self.body[sent:end]
            sent = end


@dataclass
class _Response:
    status_code: int
    headers: dict
    raw: _Raw
    closed: bool = False

    def close(self) -> None:
        self.closed = True

    def iter_content(self, chunk_size: int):
        return self.raw.stream(chunk_size)


@dataclass
class FakeSource:
    """Serves BLOB; ``cuts`` lists, per GET, after how many body bytes it breaks (None:
    not at all); ``honour_range=False`` answers every GET 200 with the whole body."""

    cuts: list = field(default_factory=list)
    honour_range: bool = True
    content_range_start: int | None = None  # force a (wrong) Content-Range start
    blob: bytes = BLOB
    registry: str = "source.test"
    offsets: list = field(default_factory=list)

    def open_blob(self, repository: str, digest: str, offset: int = 0):
        self.offsets.append(offset)
        cut = self.cuts.pop(0) if self.cuts else None
        if offset and self.honour_range:
            start = offset if self.content_range_start is None else self.content_range_start
            body = self.blob[start:]
            headers = {"Content-Range": f"bytes {start}-{len(self.blob) - 1}/{len(self.blob)}",
                       "Content-Length": str(len(body))}
            return _Response(206, headers, _Raw(body, cut))
        headers = {"Content-Length": str(len(self.blob))}
        return _Response(200, headers, _Raw(self.blob, cut))


def reader_for(source: FakeSource, size: int = len(BLOB), digest: str = DIGEST, **kwargs):
    kwargs.setdefault("policy", FAST)
    kwargs.setdefault("chunk_size", 1000)
    return BlobReader(source, "a/b", digest, size, sleep=lambda _: None, **kwargs)


def test_resumes_with_range_from_the_last_byte_received():
    source = FakeSource(cuts=[2500, 3000])
    reader = reader_for(source)
    assert b"".join(reader.read(len(BLOB))) == BLOB
    assert source.offsets == [0, 2500, 5500]
    assert reader.resumes == 2 and reader.fetched == len(BLOB)


def test_a_registry_ignoring_range_has_the_held_prefix_skipped():
    source = FakeSource(cuts=[4000], honour_range=False)
    reader = reader_for(source)
    assert b"".join(reader.read(len(BLOB))) == BLOB
    assert source.offsets == [0, 4000]
    assert reader.fetched == 4000 + len(BLOB)  # the prefix came again and was dropped


def test_a_content_range_starting_past_the_offset_is_refused():
    source = FakeSource(cuts=[4000], content_range_start=4100)
    reader = reader_for(source)
    with pytest.raises(IntegrityError, match="Content-Range"):
        b"".join(reader.read(len(BLOB)))
    assert isinstance(reader.failure, IntegrityError)


def test_resumes_are_bounded():
    source = FakeSource(cuts=[100] * 10)
    reader = reader_for(source, policy=RetryPolicy(max_retries=3, base=0.0, jitter=False))
    with pytest.raises(TransportError, match="read failed"):
        b"".join(reader.read(len(BLOB)))
    assert len(source.offsets) == 4 and reader.resumes == 3


def test_the_last_chunk_is_withheld_when_the_digest_does_not_match():
    bad = bytearray(BLOB)
    bad[5] ^= 0xFF
    reader = reader_for(FakeSource(blob=bytes(bad)))
    handed_out = []
    with pytest.raises(IntegrityError, match="does not match"):
        for piece in reader.read(len(BLOB)):
            handed_out.append(piece)
    assert sum(map(len, handed_out)) == len(BLOB) - 240  # all but the last chunk (10 240 % 1000)


def test_a_body_longer_than_its_size_is_refused():
    reader = reader_for(FakeSource(), size=len(BLOB) - 1)
    with pytest.raises(IntegrityError):
        b"".join(reader.read(len(BLOB) - 1))


def test_seek_back_rehashes_without_handing_out_and_still_verifies():
    source = FakeSource()
    reader = reader_for(source)
    first = b"".join(reader.read(4096))
    reader.confirm(4096)
    b"".join(reader.read(4096))  # a window the destination then lost part of
    reader.seek(6000)  # between checkpoints: re-read 4096..6000, hand out from 6000
    rest = b"".join(reader.read(len(BLOB) - 6000))
    assert first == BLOB[:4096] and rest == BLOB[6000:]
    assert source.offsets == [0, 4096]  # the re-read starts at the nearest checkpoint


def test_seek_to_the_end_verifies_and_restart_refetches_from_zero():
    source = FakeSource()
    reader = reader_for(source)
    b"".join(reader.read(len(BLOB)))
    reader.seek(len(BLOB))
    assert list(reader.read(0)) == []
    reader.restart()
    assert b"".join(reader.read(len(BLOB))) == BLOB
    assert source.offsets == [0, 0]


def test_size_comes_from_the_response_when_the_descriptor_has_none():
    reader = reader_for(FakeSource(), size=-1)
    assert reader.ensure_size() == len(BLOB)
    assert b"".join(reader.read(len(BLOB))) == BLOB


def test_empty_blob_is_verified_without_bytes():
    empty = "sha256:" + hashlib.sha256(b"").hexdigest()
    reader = reader_for(FakeSource(blob=b""), size=0, digest=empty)
    assert list(reader.read(0)) == []


@pytest.mark.parametrize(
    ("header", "confirmed", "held"),
    [("0-0", 0, 0), ("0-0", 1, 1), ("0-1", 2, 2), ("bytes=0-65535", 0, 65536), ("", 0, 0)],
)
def test_upload_range_header(header, confirmed, held):
    assert _held_bytes(header, confirmed) == held


def test_resumes_that_make_progress_renew_the_budget():
    source = FakeSource(cuts=[1500] * 6)  # every GET breaks after 1.5 chunks
    reader = reader_for(source, policy=RetryPolicy(max_retries=2, base=0.0, jitter=False))
    assert b"".join(reader.read(len(BLOB))) == BLOB
    assert reader.resumes == 6
