"""Variable substitution in Dockerfile words, with the rules of BuildKit's shell lexer.

Shared by the builder and by `commit --change` / `import --change` (berthd.common.changes).

The instructions Docker expands (ADD, ARG, COPY, ENV, EXPOSE, LABEL, STOPSIGNAL, USER, VOLUME,
WORKDIR, and FROM with the global args) pass each word through `expand`:

- `$VAR`, `${VAR}`; `${VAR:-default}` / `${VAR-default}` (default when unset, with `:` also
  when empty), `${VAR:+alt}` / `${VAR+alt}`, `${VAR:?message}` / `${VAR?message}`;
  an unset variable expands to nothing, as in Docker;
- single quotes keep everything literal, double quotes still expand `$`; quotes are removed
  (`ENV A="a b"` sets `a b`);
- the escape character (`\\`, or the one the `# escape=` directive chose) makes the next
  character literal; inside double quotes it only escapes `"`, `$` and itself.

RUN, CMD and ENTRYPOINT are never expanded here: the shell in the container does that.
Errors are InvalidArgument without a line; the Dockerfile evaluator adds the line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from berthd.common.errors import InvalidArgument
from berthd.common.oci.digest import quoted

# $0, $#, $? and friends: sh's special parameters, which BuildKit also reads as names.
_SPECIAL_PARAMETERS = frozenset("@*#?-$!0")


def expand(word: str, env: Mapping[str, str], escape: str = "\\") -> str:
    """`word` with quotes and escapes removed and variables expanded from `env`."""
    return _Lexer(word, env, escape).process()[0]


def expand_words(word: str, env: Mapping[str, str], escape: str = "\\") -> list[str]:
    """Like `expand`, then split on whitespace that did not come from quotes or escapes
    (EXPOSE's rule: `EXPOSE $PORTS` with PORTS="80 443" exposes two ports)."""
    return _Lexer(word, env, escape).process()[1]


def split_key_values(words: Sequence[str]) -> list[tuple[str, str]]:
    """ENV and LABEL arguments as (key, value) pairs. The parser already turned both forms
    (`K=V K2=V2` and the legacy `K V w`) into a flat key, value, key, value... list."""
    if len(words) % 2:
        raise InvalidArgument(f"expected key=value pairs, got {quoted(list(words))}")
    return list(zip(words[::2], words[1::2], strict=True))


def split_arg(word: str) -> tuple[str, str | None]:
    """An ARG declaration: `NAME=default` -> (NAME, default), `NAME` -> (NAME, None)."""
    name, equals, default = word.partition("=")
    if not name:
        raise InvalidArgument(f"ARG names must not be empty ({quoted(word)})")
    return name, default if equals else None


class _Words:
    """Collects the whitespace-separated words of an expansion, as BuildKit does: quoted and
    escaped characters never split a word, whitespace from a variable's value does."""

    def __init__(self) -> None:
        self.words: list[str] = []
        self.current = ""
        self.in_word = False

    def add(self, text: str) -> None:
        for ch in text:
            if not ch.isspace():
                self.add_raw(ch)
            elif self.in_word:
                self.finish()

    def add_raw(self, text: str) -> None:
        self.current += text
        self.in_word = True

    def finish(self) -> list[str]:
        if self.current:
            self.words.append(self.current)
        self.current, self.in_word = "", False
        return self.words


class _Lexer:
    def __init__(self, text: str, env: Mapping[str, str], escape: str) -> None:
        self.text = text
        self.env = env
        self.escape = escape
        self.pos = 0

    def fail(self, what: str) -> InvalidArgument:
        return InvalidArgument(f"{quoted(self.text)}: {what}")

    def at_end(self) -> bool:
        return self.pos >= len(self.text)

    def peek(self) -> str:
        return "" if self.at_end() else self.text[self.pos]

    def next(self) -> str:
        ch = self.peek()
        self.pos += 1
        return ch

    def process(self, stop: str = "") -> tuple[str, list[str]]:
        """Up to `stop` (consumed) or the end: the expanded text and its words."""
        result: list[str] = []
        words = _Words()
        while not self.at_end():
            ch = self.peek()
            if stop and ch == stop:
                self.pos += 1
                return "".join(result), words.finish()
            if ch == "$":
                value = self.dollar()
                words.add(value)
            elif ch in "'\"":
                value = self.single_quoted() if ch == "'" else self.double_quoted()
                words.add_raw(value)
            else:
                self.pos += 1
                if ch == self.escape:
                    if self.at_end():
                        break  # a trailing escape character escapes nothing
                    value = self.next()
                    words.add_raw(value)
                else:
                    value = ch
                    words.add(value)
            result.append(value)
        if stop:
            raise self.fail(f"missing {stop}")
        return "".join(result), words.finish()

    def single_quoted(self) -> str:
        self.pos += 1
        end = self.text.find("'", self.pos)
        if end == -1:
            raise self.fail("no closing single quote")
        value = self.text[self.pos : end]
        self.pos = end + 1
        return value

    def double_quoted(self) -> str:
        self.pos += 1
        out: list[str] = []
        while not self.at_end():
            ch = self.peek()
            if ch == '"':
                self.pos += 1
                return "".join(out)
            if ch == "$":
                out.append(self.dollar())
                continue
            self.pos += 1
            if ch == self.escape and self.peek() in ('"', "$", self.escape):
                ch = self.next()
            out.append(ch)
        raise self.fail("no closing double quote")

    def name(self) -> str:
        start = self.pos
        if self.peek().isdigit():
            while self.peek().isdigit():
                self.pos += 1
        elif self.peek() in _SPECIAL_PARAMETERS:
            self.pos += 1
        else:
            while not self.at_end() and (self.peek().isalnum() or self.peek() == "_"):
                self.pos += 1
        return self.text[start : self.pos]

    def dollar(self) -> str:
        self.pos += 1  # the $
        if self.peek() != "{":
            name = self.name()
            return self.env.get(name, "") if name else "$"
        self.pos += 1
        if self.at_end():
            raise self.fail("missing }")
        if self.peek() in "{}:":
            raise self.fail("bad substitution")
        name = self.name()
        operator = self.next()
        if operator == "}":
            return self.env.get(name, "")
        colon = operator == ":"
        if colon:
            operator = self.next()
        if not operator:
            raise self.fail("missing }")
        if operator not in ("-", "+", "?"):
            shown = ":" + operator if colon else operator
            raise self.fail(f"unsupported modifier {shown}")
        word = self.process(stop="}")[0]
        # With ':' an empty value counts as unset, as in sh.
        is_set = name in self.env and not (colon and self.env[name] == "")
        if operator == "-":
            return self.env[name] if is_set else word
        if operator == "+":
            return word if is_set else ""
        if not is_set:
            raise InvalidArgument(
                f"{name}: {word or ('is empty' if name in self.env else 'is not set')}"
            )
        return self.env[name]
