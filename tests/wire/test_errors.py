"""The wire's two errors: WireError's one message shape, and LocalWireError's place in the tree."""

from __future__ import annotations

import pytest

from livemig.errors import LocalWireError, MigrationError, PayloadError, WireError
from livemig.wire.stream import configuration, ram_page, section_start


def test_message_shape_and_attributes() -> None:
    err = WireError("RAM: block id", "pc.rom", "one of ['pc.ram']", note="Unknown ramblock")
    assert str(err) == "RAM: block id: received 'pc.rom', expected one of ['pc.ram'] (Unknown ramblock)"
    assert (err.what, err.value, err.expected) == ("RAM: block id", "pc.rom", "one of ['pc.ram']")


def test_hex_applies_to_integers_only() -> None:
    assert str(WireError("m", 0x40, 0x3F, hex=True)) == "m: received 0x40, expected 0x3f"
    assert str(WireError("m", 0x40, "<= 0x3f", hex=True)) == "m: received 0x40, expected <= 0x3f"
    assert str(WireError("m", True, False, hex=True)) == "m: received True, expected False"


def test_text_only_and_bytes_values() -> None:
    assert str(WireError("main stream: connection closed")) == "main stream: connection closed"
    assert str(WireError("id", b"\xff", "ASCII")) == "id: received b'\\xff', expected ASCII"
    assert str(WireError("n", 0, 1)) == "n: received 0, expected 1"  # falsy values are still shown


def test_tree() -> None:
    assert issubclass(PayloadError, WireError) and issubclass(WireError, MigrationError)
    assert issubclass(LocalWireError, MigrationError) and not issubclass(LocalWireError, WireError)
    assert not issubclass(LocalWireError, ValueError)


@pytest.mark.parametrize(
    ("call", "text"),
    [
        (lambda: section_start(1, "rämm", 0, 1), "section idstr 'rämm' is not ASCII"),
        (lambda: section_start(1, "", 0, 1), "section idstr '' is 0 bytes, expected 1..255"),
        (lambda: configuration("x" * 257), "is 257 bytes, expected 1..256"),
        (lambda: ram_page("b", 0, b"short"), "RAM page data is 5 bytes, expected 4096"),
        (lambda: ram_page("b", 100, bytes(4096)), "RAM offset 0x64 is not a multiple of the page size 4096"),
    ],
)
def test_writer_errors_name_the_argument(call: object, text: str) -> None:
    with pytest.raises(LocalWireError) as info:
        call()  # type: ignore[operator]
    assert text in str(info.value)
