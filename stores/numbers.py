"""Numbers in text from outside (headers, Dify's JSON, settings, Redis URLs): ASCII digits only, and not
too many. At the bottom layer, so that ``stores`` (which imports nothing from ``laibao``) and ``laibao``
share the one check."""

from __future__ import annotations


def ascii_digits(text: str, most: int | None = None) -> bool:
    """True if ``text`` is one to ``most`` (any number if None) ASCII digits.

    ``str.isdigit()`` alone also accepts "²" or "٣", which ``int()`` refuses, and ``int()`` refuses
    more than 4300 digits: check with this before converting, so odd input is a clear error, not a crash.
    """
    return text.isascii() and text.isdigit() and (most is None or len(text) <= most)
