"""berthd.common.substitute: Dockerfile variable substitution with BuildKit's quoting rules."""

from __future__ import annotations

import pytest

from berthd.common.errors import InvalidArgument
from berthd.common.substitute import expand, expand_words, split_arg, split_key_values

ENV = {"A": "1", "EMPTY": "", "SPACED": "x  y", "PATH": "/bin"}


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("$A", "1"),
        ("${A}", "1"),
        ("a${A}b", "a1b"),
        ("$A-b", "1-b"),
        ("$MISSING", ""),  # unknown variables expand to nothing, as in Docker
        ("${MISSING}x", "x"),
        ("/usr/bin:$PATH", "/usr/bin:/bin"),
        ("${MISSING:-d}", "d"),
        ("${EMPTY:-d}", "d"),  # with ':' empty counts as unset
        ("${EMPTY-d}", ""),  # without it only unset does
        ("${MISSING-d}", "d"),
        ("${A:-d}", "1"),
        ("${A:+alt}", "alt"),
        ("${EMPTY:+alt}", ""),
        ("${EMPTY+alt}", "alt"),
        ("${MISSING+alt}", ""),
        ("${MISSING:-$A}", "1"),  # the default is expanded too
        ("${MISSING:-'lit $A'}", "lit $A"),
        ("${A:?must be set}", "1"),
        ("$", "$"),
        ("a$", "a$"),
        ("$1x", "x"),  # positional parameter, then literal text
    ],
)
def test_expansion(word, expected):
    assert expand(word, ENV) == expected


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("'$A'", "$A"),  # single quotes keep everything literal
        ('"$A"', "1"),  # double quotes still expand
        ('"a b"', "a b"),  # and the quotes go
        ("'a b'c", "a bc"),
        ('"it\'s"', "it's"),
        ("'say \"hi\"'", 'say "hi"'),
        ('"a\\"b"', 'a"b'),
        ('"\\$A"', "$A"),
        ('"a\\b"', "a\\b"),  # in double quotes a backslash escapes only " $ and itself
        ("a\\ b", "a b"),
        ("\\$A", "$A"),
        ("\\'", "'"),
        ("C:\\\\dir", "C:\\dir"),
        ("end\\", "end"),  # a trailing escape escapes nothing
    ],
)
def test_quotes_and_escapes(word, expected):
    assert expand(word, ENV) == expected


def test_escape_directive_character():
    # With `# escape=\``, backslashes are plain characters (Windows paths) and ` escapes.
    assert expand("C:\\dir\\$A", ENV, escape="`") == "C:\\dir\\1"
    assert expand("`$A and ``", ENV, escape="`") == "$A and `"
    assert expand('"a`"b"', ENV, escape="`") == 'a"b'


def test_words_split_on_expanded_whitespace_only():
    assert expand("$SPACED", ENV) == "x  y"
    assert expand_words("$SPACED", ENV) == ["x", "y"]
    assert expand_words('"$SPACED"', ENV) == ["x  y"]
    assert expand_words("a\\ b", ENV) == ["a b"]
    assert expand_words("$EMPTY", ENV) == []
    assert expand_words("80 ${A}0/udp", ENV) == ["80", "10/udp"]


@pytest.mark.parametrize(
    ("word", "message"),
    [
        ("${", "missing }"),
        ("${A", "missing }"),
        ("${A:-x", "missing }"),
        ("${A:", "missing }"),
        ("${}", "bad substitution"),
        ("${:-x}", "bad substitution"),
        ("${A:x}", "unsupported modifier :x"),
        ("${A%x}", "unsupported modifier %"),
        ("'abc", "no closing single quote"),
        ('"abc', "no closing double quote"),
        ("${MISSING:?set it please}", "MISSING: set it please"),
        ("${EMPTY:?}", "EMPTY: is empty"),
        ("${MISSING?}", "MISSING: is not set"),
    ],
)
def test_bad_syntax_is_an_error(word, message):
    with pytest.raises(InvalidArgument, match="^.*" + message.replace("$", "\\$")):
        expand(word, ENV)


def test_question_mark_without_colon_accepts_empty():
    assert expand("${EMPTY?unset}", ENV) == ""


def test_split_key_values_pairs_the_parser_words():
    assert split_key_values(["A", "1", "B", "x y"]) == [("A", "1"), ("B", "x y")]
    assert split_key_values([]) == []
    with pytest.raises(InvalidArgument):
        split_key_values(["A"])


def test_split_arg():
    assert split_arg("NAME") == ("NAME", None)
    assert split_arg("NAME=") == ("NAME", "")
    assert split_arg("NAME=a=b") == ("NAME", "a=b")
    with pytest.raises(InvalidArgument, match="must not be empty"):
        split_arg("=x")
