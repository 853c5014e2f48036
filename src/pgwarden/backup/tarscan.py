"""A tar stream watched as it goes by: a backup to an object store is piped from pg_basebackup
straight into the upload, and the two small files pgwarden needs from it (backup_label for the
start position, backup_manifest for the rest) are kept on the way, so nothing is staged on
local disk. Push-based (bytes are fed in the order the uploader reads them), because the
uploader, not this module, drives the reading.

Only what pg_basebackup writes needs reading: POSIX ustar headers, sizes in octal or in the
base-256 form used above 8 GiB. Other header kinds (GNU long names, pax) are members like any
other here: their content is skipped by its size, which is all the scan needs.
"""

from __future__ import annotations

from collections.abc import Iterable

from pgwarden.errors import ServerError

BLOCK = 512


class TarScan:
    """Feed a tar stream in; `finish` returns the wanted members' contents."""

    def __init__(self, wanted: Iterable[str], *, limit: int = 256 << 20) -> None:
        self.wanted = frozenset(wanted)
        self.limit = limit  # bytes kept per member: a manifest is about 150 bytes per file
        self.found: dict[str, bytes] = {}
        self.total = 0  # bytes fed
        self._header = bytearray()
        self._left = 0  # content (plus padding) of the current member still to come
        self._keep: bytearray | None = None
        self._keep_left = 0  # of `_left`, the content part (not padding)
        self._name = ""
        self._ended = False  # the end-of-archive block was seen

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        view = memoryview(data)
        while view:
            if self._ended:
                return  # zero blocks after the end marker: nothing to read
            if self._left:
                take = min(self._left, len(view))
                if self._keep is not None and self._keep_left:
                    part = min(take, self._keep_left)
                    self._keep += view[:part]
                    self._keep_left -= part
                    if not self._keep_left:
                        self.found[self._name] = bytes(self._keep)
                        self._keep = None
                self._left -= take
                view = view[take:]
                continue
            take = min(BLOCK - len(self._header), len(view))
            self._header += view[:take]
            view = view[take:]
            if len(self._header) == BLOCK:
                self._start_member(bytes(self._header))
                self._header.clear()

    def _start_member(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._ended = True
            return
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        size = _number(header[124:136])
        self._left = size + (-size % BLOCK)
        kind = header[156:157]
        if name in self.wanted and kind in (b"0", b"\0"):
            if size > self.limit:
                raise ServerError(f"the backup's {name} is {size} bytes, more than expected")
            self._name = name
            self._keep_left = size
            self._keep = bytearray()
            if not size:
                self.found[name] = b""
                self._keep = None

    def finish(self) -> dict[str, bytes]:
        """The wanted members; an error when the stream stopped short of a complete archive
        (pg_basebackup cut off) or lacked one of them."""
        if not self._ended or self._left:
            raise ServerError(
                f"the backup's tar stream ended after {self.total} bytes, before its end: "
                "the upload is incomplete and is not kept"
            )
        missing = sorted(self.wanted - self.found.keys())
        if missing:
            raise ServerError(f"the backup's tar stream has no {', '.join(missing)}")
        return self.found


def _number(field: bytes) -> int:
    """A tar header's number: octal text, or base-256 (first byte 0x80) for large values."""
    if field[0] & 0x80:
        value = field[0] & 0x7F
        for byte in field[1:]:
            value = (value << 8) | byte
        return value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0
