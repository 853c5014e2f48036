"""A backup's tar both ways. On its way to an object store, the scan that reads backup_label and
backup_manifest out of it: whatever the chunking, whatever the header kinds around them, it
returns exactly their bytes, and a stream cut anywhere before its end is refused. On its way
back, unpacked as it downloads: a tampered one writes nothing outside its target."""

from __future__ import annotations

import io
import itertools
import re
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgwarden.backup.repo import BackupInfo, Repository
from pgwarden.backup.restore import materialize
from pgwarden.backup.tarscan import TarScan
from pgwarden.errors import ServerError, UserError

LABEL = b"START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nSTART TIMELINE: 1\n"


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.USTAR_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("pg_wal")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return out.getvalue()


def _feed(scan: TarScan, data: bytes, cuts: list[int]) -> None:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        scan.feed(data[a:b])


@settings(max_examples=150, deadline=None)
@given(
    manifest=st.binary(min_size=0, max_size=3000),
    other=st.binary(min_size=0, max_size=2000),
    cuts=st.lists(st.integers(min_value=0, max_value=12_000), max_size=12),
    fmt=st.sampled_from([tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT]),
)
def test_the_wanted_members_come_out_whole_whatever_the_chunks(
    manifest: bytes, other: bytes, cuts: list[int], fmt: int
) -> None:
    data = _tar(
        [
            ("backup_label", LABEL),
            # A long name: ustar's prefix field, or GNU/pax extension headers before it.
            ("base/" + "d" * 60 + "/" + "f" * 90, other),
            ("global/pg_control", other[:100]),
            ("backup_manifest", manifest),
        ],
        fmt,
    )
    scan = TarScan(("backup_label", "backup_manifest"))
    _feed(scan, data, cuts)
    assert scan.finish() == {"backup_label": LABEL, "backup_manifest": manifest}
    assert scan.total == len(data)


@settings(max_examples=100, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_a_stream_cut_short_is_refused(cut: int) -> None:
    data = _tar([("backup_label", LABEL), ("base/1/1259", b"z" * 5000), ("backup_manifest", b"{}")])
    end = len(data)  # tarfile pads to its record size with zero blocks: back over them
    while data[end - 512 : end] == bytes(512):
        end -= 512
    cut = min(cut, end + 511)  # anywhere before the end-of-archive block is whole
    scan = TarScan(("backup_label", "backup_manifest"))
    scan.feed(data[:cut])
    with pytest.raises(ServerError, match="ended after"):
        scan.finish()


def test_a_missing_member_is_named() -> None:
    scan = TarScan(("backup_label", "backup_manifest"))
    scan.feed(_tar([("backup_label", LABEL)]))
    with pytest.raises(ServerError, match="has no backup_manifest"):
        scan.finish()


def test_sizes_in_base_256_are_read() -> None:
    """Members over 8 GiB have their size in base-256 (first byte 0x80); a header that says so
    for a small member is read right too."""
    header = bytearray(tarfile.TarInfo("backup_manifest").tobuf(tarfile.USTAR_FORMAT))
    header[124:136] = b"\x80" + (5).to_bytes(11, "big")
    header[148:156] = b"        "
    checksum = sum(header)
    header[148:156] = f"{checksum:06o}\0 ".encode()
    data = bytes(header) + b"hello" + bytes(507) + bytes(1024)
    scan = TarScan(("backup_manifest",))
    scan.feed(data)
    assert scan.finish() == {"backup_manifest": b"hello"}
    # Python's own reader agrees on that header.
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        member = tar.extractfile("backup_manifest")
        assert member is not None
        assert member.read() == b"hello"


def _info(label: str) -> BackupInfo:
    now = datetime.now(UTC)
    return BackupInfo(
        label=label, kind="full", parent=None, timeline=1, start_lsn="0/2000028",
        stop_lsn="0/2000100", start_time=now, stop_time=now, size_bytes=1,
        system_identifier="1", pg_major=18, pg_version="18.1", data_checksums=True,
        format="base-tar",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("member", "kind", "said"),
    [
        ("../escaped", tarfile.REGTYPE, "a path outside the data directory: ../escaped"),
        ("{tmp}/escaped", tarfile.REGTYPE, "a path outside the data directory: {tmp}/escaped"),
        ("pg_tblspc/16384", tarfile.SYMTYPE, "neither a file nor a directory"),
    ],
)
def test_a_tampered_backup_tar_writes_nothing_outside_and_leaves_no_half_restore(
    tmp_path: Path, member: str, kind: bytes, said: str
) -> None:
    """A backup's tar is unpacked as it downloads, so each member is checked before it is
    written: one that would land outside the target (or a link) stops the restore, nothing is
    written outside, and the half-unpacked target is removed."""
    member, said = member.format(tmp=tmp_path), said.format(tmp=tmp_path)
    repo = Repository.at(tmp_path / "backups")
    label = "20260101T000000Z"
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("PG_VERSION", b"18\n"), ("backup_label", LABEL)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        bad = tarfile.TarInfo(member)
        bad.type = kind
        if kind == tarfile.SYMTYPE:
            bad.linkname = "/elsewhere"
        else:
            bad.size = 4
        tar.addfile(bad, io.BytesIO(b"evil") if kind == tarfile.REGTYPE else None)
    repo.store.upload(f"backups/{label}/base.tar", io.BytesIO(out.getvalue()))
    repo.store.write(f"backups/{label}/backup_manifest", b"{}")
    target = tmp_path / "restore" / "data"
    with pytest.raises(UserError, match=re.escape(said)):
        materialize(repo, _info(label), target)
    assert not target.exists()
    assert not (tmp_path / "restore" / "escaped").exists()
    assert not (tmp_path / "escaped").exists()  # where the absolute member aimed


def test_a_streamed_backup_unpacks_with_an_empty_pg_wal(tmp_path: Path) -> None:
    repo = Repository.at(tmp_path / "backups")
    label = "20260101T000000Z"
    tar = _tar([("PG_VERSION", b"18\n"), ("backup_label", LABEL), ("backup_manifest", b"{}")])
    repo.store.upload(f"backups/{label}/base.tar", io.BytesIO(tar))
    repo.store.write(f"backups/{label}/backup_manifest", b'{"from": "beside"}')
    target = tmp_path / "data"
    materialize(repo, _info(label), target)
    assert (target / "PG_VERSION").read_bytes() == b"18\n"
    assert (target / "backup_label").read_bytes() == LABEL
    assert (target / "backup_manifest").read_bytes() == b'{"from": "beside"}'
    assert (target / "pg_wal").is_dir()
    assert list((target / "pg_wal").iterdir()) == []
