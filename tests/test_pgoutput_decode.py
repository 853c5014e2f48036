"""The compiled pgoutput decoder (native/pgoutput.c) against its reference in Python
(wal._decode_change_py): the same values for every message, the same refusal of every
malformed one. The consumer uses the compiled one when it is built; scripts/test.sh makes sure
it is, so this never skips in CI."""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pgwarden.history import wal

_pgoutput = pytest.importorskip("pgwarden.native._pgoutput")

# A column: text (any bytes, the characters COPY escapes often), NULL, or an unchanged TOAST.
columns = st.one_of(
    st.tuples(
        st.just(b"t"),
        st.binary(max_size=12) | st.sampled_from([b"\\", b"a\tb", b"\n\r", b"\\N", b"\\u", b""]),
    ),
    st.tuples(st.sampled_from([b"n", b"u"]), st.just(b"")),
)


def _tuple(cols: list[tuple[bytes, bytes]]) -> bytes:
    out = struct.pack(">h", len(cols))
    for kind, value in cols:
        out += kind + (struct.pack(">i", len(value)) + value if kind == b"t" else b"")
    return out


@st.composite
def messages(draw: st.DrawFn) -> bytes:
    relid = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    cols = st.lists(columns, max_size=6)
    kind = draw(st.sampled_from("IUDK"))
    if kind == "I":
        return b"I" + relid + b"N" + _tuple(draw(cols))
    if kind == "D":
        return b"D" + relid + draw(st.sampled_from([b"K", b"O"])) + _tuple(draw(cols))
    if kind == "U":
        return b"U" + relid + b"N" + _tuple(draw(cols))
    old = draw(st.sampled_from([b"K", b"O"]))
    return b"U" + relid + old + _tuple(draw(cols)) + b"N" + _tuple(draw(cols))


def _outcome(decode: object, message: bytes) -> object:
    try:
        return decode(message)  # type: ignore[operator]
    except ValueError as error:
        return ("ValueError", str(error))


@settings(max_examples=400, deadline=None)
@given(message=messages())
@example(message=b"U\x00\x00\x00\x01O\x00\x01t\x00\x00\x00\x02\\\tN\x00\x01n")
def test_compiled_decoder_matches_the_reference(message: bytes) -> None:
    expected = wal._decode_change_py(message)
    assert _pgoutput.decode_change(message) == expected
    relid, op, old, new = expected
    assert relid == struct.unpack_from(">I", message, 1)[0]
    assert op == chr(message[0])
    for values in (old, new):
        for value in values or []:
            # A COPY text field: nothing unescaped that would end the field or the row.
            assert not set(value) & {9, 10, 13}
    # Every shorter prefix (a message cut short) is refused alike by both, never read past.
    for end in range(len(message)):
        cut = message[:end]
        assert _outcome(_pgoutput.decode_change, cut) == _outcome(wal._decode_change_py, cut)


@settings(max_examples=400, deadline=None)
@given(message=st.binary(max_size=40))
def test_garbage_is_refused_alike(message: bytes) -> None:
    assert _outcome(_pgoutput.decode_change, message) == _outcome(wal._decode_change_py, message)


def test_values_are_copy_fields() -> None:
    message = b"I\x00\x00\x00\x07N" + _tuple(
        [(b"t", b"a\\b\tc\nd\re"), (b"n", b""), (b"u", b""), (b"t", b"\\N")]
    )
    assert _pgoutput.decode_change(message) == (
        7,
        "I",
        None,
        [b"a\\\\b\\tc\\nd\\re", b"\\N", b"\\u", b"\\\\N"],
    )


def test_a_column_kind_pgoutput_was_not_asked_for_is_refused() -> None:
    message = b"I\x00\x00\x00\x07N" + struct.pack(">h", 1) + b"b" + struct.pack(">i", 1) + b"x"
    for decode in (_pgoutput.decode_change, wal._decode_change_py):
        with pytest.raises(ValueError, match="unexpected tuple column kind 'b'"):
            decode(message)
