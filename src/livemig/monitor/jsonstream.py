"""Split a QMP byte stream into JSON messages, as QEMU's json-streamer does.

QMP has no framing: a message ends where its outermost ``{...}`` closes, newline or not (``qemu.qmp``
sends none). Like QEMU's parser this accepts ``'single-quoted'`` strings and the ``\\'`` escape,
limits a message to :data:`MAX_TOKEN_SIZE` bytes and :data:`MAX_NESTING` levels, and treats a
control character outside a string as a lexical error that resets the parser (QEMU's documented
way to resynchronise). Each problem becomes one :class:`StreamError` with QEMU's wording and the
stream carries on with the next message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

#: QEMU's qobject/json-streamer.c limits
MAX_TOKEN_SIZE = 64 << 20
MAX_NESTING = 1 << 10

_SPACE = b" \t\r\n"
_TOP = re.compile(rb"[^ \t\r\n]")
_INNER = re.compile(rb"[{}\[\]\"'\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\xff]")
_STR_END = {ord('"'): re.compile(rb'["\\]'), ord("'"): re.compile(rb"['\\]")}
_SCALAR_END = re.compile(rb"[ \t\r\n{}\[\]\"',:]")


@dataclass(frozen=True)
class StreamError:
    """Input that is not a JSON value; ``desc`` is what QEMU answers (class GenericError)."""

    desc: str


def _requote(text: str) -> str:
    """Rewrite QEMU's single-quoted strings (and the ``\\'`` escape) as standard JSON."""
    out: list[str] = []
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if not quote:
            if ch in "\"'":
                quote = ch
                ch = '"'
        elif ch == "\\":
            nxt = text[i + 1 : i + 2]
            out.append("'" if nxt == "'" else text[i : i + 2])
            i += 2
            continue
        elif ch == quote:
            quote = ""
            ch = '"'
        elif ch == '"':
            ch = '\\"'
        out.append(ch)
        i += 1
    return "".join(out)


def _parse(raw: bytes, single: bool) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return StreamError("JSON parse error, invalid UTF-8 sequence in string")
    try:
        return json.loads(_requote(text) if single else text)
    except json.JSONDecodeError as exc:
        return StreamError(f"JSON parse error, {exc.msg[:1].lower()}{exc.msg[1:]}")


class JSONStream:
    """Feed bytes, get complete messages (parsed JSON values or :class:`StreamError`) in order."""

    def __init__(self, max_size: int = MAX_TOKEN_SIZE, max_depth: int = MAX_NESTING) -> None:
        self.max_size = max_size
        self.max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0
        self._depth = 0
        self._quote = 0
        self._single = False
        self._skipping = False

    def feed(self, data: bytes) -> list[Any]:
        self._buf += data
        out: list[Any] = []
        while (item := self._scan()) is not None:
            if not isinstance(item, _Skipped):
                out.append(item)
        if self._depth and not self._skipping and len(self._buf) > self.max_size:
            out.append(self._start_skipping("JSON token size limit exceeded"))
        if self._skipping:
            del self._buf[: self._pos]
            self._pos = 0
        return out

    def _cut(self, end: int) -> bytes:
        raw = bytes(self._buf[:end])
        del self._buf[:end]
        self._pos = 0
        return raw

    def _start_skipping(self, desc: str) -> StreamError:
        self._skipping = True
        del self._buf[: self._pos]
        self._pos = 0
        return StreamError(desc)

    def _complete(self, end: int) -> Any:
        raw = self._cut(end)
        single, self._single = self._single, False
        if self._skipping:
            self._skipping = False
            return _Skipped()
        if len(raw) > self.max_size:
            return StreamError("JSON token size limit exceeded")
        return _parse(raw, single)

    def _scan(self) -> Any:
        buf = self._buf
        while self._pos < len(buf):
            if self._quote:
                m = _STR_END[self._quote].search(buf, self._pos)
                if m is None:
                    self._pos = len(buf)
                    return None
                i = m.start()
                if buf[i] == 0x5C:  # backslash: the next byte is escaped
                    if i + 1 >= len(buf):
                        self._pos = i
                        return None
                    self._pos = i + 2
                    continue
                self._quote = 0
                self._pos = i + 1
                if self._depth == 0:
                    return self._top_scalar(self._pos)
                continue
            m = (_INNER if self._depth else _TOP).search(buf, self._pos)
            if m is None:
                self._pos = len(buf)
                return None
            i = m.start()
            c = buf[i]
            self._pos = i + 1
            if c in b"\"'":
                self._quote = c
                self._single = self._single or c == 0x27
            elif c in b"{[":
                self._depth += 1
                if self._depth > self.max_depth and not self._skipping:
                    return self._start_skipping("JSON nesting depth limit exceeded")
            elif c in b"}]" and self._depth:
                self._depth -= 1
                if self._depth == 0:
                    return self._complete(i + 1)
            elif c < 0x20 or c >= 0x7F or c in b"}]":
                # lexical error: QEMU resets its parser and reports the stray byte
                self._cut(i + 1)
                self._depth = self._quote = 0
                self._single = self._skipping = False
                shown = chr(c) if 0x20 <= c < 0x7F else f"\\x{c:02x}"
                return StreamError(f"JSON parse error, stray '{shown}'")
            elif self._depth == 0:
                e = _SCALAR_END.search(buf, i)
                if e is None:
                    self._pos = i
                    return None
                return self._top_scalar(e.start())
        return None

    def _top_scalar(self, end: int) -> Any:
        """A complete value outside any object: a JSON scalar, or a stray token."""
        raw = self._cut(end).strip(_SPACE)
        single, self._single = self._single, False
        value = _parse(raw, single)
        if isinstance(value, StreamError):
            return StreamError(f"JSON parse error, stray '{raw.decode('utf-8', 'replace')}'")
        return value


class _Skipped:
    """The end of an oversized message whose error was already reported."""
