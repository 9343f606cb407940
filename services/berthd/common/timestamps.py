"""RFC 3339 times as runc, conmon and image configs write them."""

from __future__ import annotations

from datetime import UTC, datetime


def parse_rfc3339(text: str) -> datetime:
    """RFC 3339 with up to nanoseconds (conmon, runc) -> UTC datetime (microseconds kept)."""
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dot = text.find(".")
    if dot != -1:
        end = dot + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        # datetime holds microseconds: keep at most 6 digits of the fraction.
        text = text[: dot + 1] + text[dot + 1 : end][:6] + text[end:]
    parsed = datetime.fromisoformat(text)
    # conmon writes local time with its offset; one zone makes records comparable.
    return parsed.astimezone(UTC) if parsed.tzinfo else parsed.replace(tzinfo=UTC)
