"""Reading what a `berth` command printed, for the CLI unit tests."""

from __future__ import annotations

import re

import pytest


def error_line(capsys: pytest.CaptureFixture[str], out: str = "") -> str:
    """The single line a failed command wrote to stderr (stdout must be exactly `out`)."""
    captured = capsys.readouterr()
    assert captured.out == out
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("Error: ")
    return lines[0]


def table(text: str) -> list[list[str]]:
    """A table's cells: columns are at least three spaces apart."""
    return [re.split(r" {3,}", line) for line in text.splitlines()]
