"""Detach keys in Docker's notation, written once for the CLI (which checks `--detach-keys`) and
the node agent (which watches a terminal's input for them).

"ctrl-p,ctrl-q" (the default) is Ctrl-P then Ctrl-Q. Each comma-separated key is one character
("a", "x") or `ctrl-` followed by one of a-z, @, [, \\, ], ^, _ (ctrl-@ is NUL, ctrl-a is 1, ...,
ctrl-_ is 31). The sequence may be several keys long.
"""

from __future__ import annotations

from berth.errors import InvalidArgumentError

__all__ = ["DEFAULT_DETACH_KEYS", "DetachMatcher", "parse_detach_keys"]

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"
# Docker's term.ASCII: the position in this list is the byte.
_CTRL = ["ctrl-@", *(f"ctrl-{c}" for c in "abcdefghijklmnopqrstuvwxyz"), "ctrl-[", "ctrl-\\"]
_CTRL += ["ctrl-]", "ctrl-^", "ctrl-_"]


def parse_detach_keys(text: str) -> bytes:
    """The bytes of a detach key sequence; the default for an empty text.

    Raises InvalidArgumentError for a key that is neither one character nor a known ctrl-key.
    """
    if not text:
        text = DEFAULT_DETACH_KEYS
    codes = bytearray()
    for key in text.split(","):
        if len(key) == 1 and key.isascii():
            codes.append(ord(key))
        elif key.lower() in _CTRL:
            codes.append(_CTRL.index(key.lower()))
        else:
            raise InvalidArgumentError(
                f"invalid detach keys {text!r}: {key!r} is not a character or ctrl-<a-z@[\\]^_> "
                f"(e.g. {DEFAULT_DETACH_KEYS})"
            )
    return bytes(codes)


class DetachMatcher:
    """Finds the detach sequence in a stream of input, across chunk boundaries.

    `feed` returns the bytes to pass on to the process and whether the sequence was typed.
    Bytes that start the sequence are held back until the sequence completes (they are then
    dropped, as Docker does) or breaks (they are then passed on, in order).
    """

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self._held = 0  # how many bytes of the sequence have been matched so far

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        if not self.keys:
            return data, False
        out = bytearray()
        for i, byte in enumerate(data):
            if byte == self.keys[self._held]:
                self._held += 1
                if self._held == len(self.keys):
                    self._held = 0
                    return bytes(out), True
                continue
            if self._held:
                out += self.keys[: self._held]
                self._held = 0
                # The byte that broke the sequence may start it afresh.
                if byte == self.keys[0]:
                    self._held = 1
                    continue
            out.append(data[i])
        return bytes(out), False
