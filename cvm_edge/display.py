"""Text from data (class names, file names) made safe to print on a terminal or in a log. stdlib only."""

from __future__ import annotations

import unicodedata

# Bidirectional-text controls: they reorder what a terminal shows (a name can look like another).
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: str) -> str:
    """``text`` safe to print on a terminal or in a log: control characters (ANSI escapes, newlines,
    carriage returns), bidirectional controls and undecodable bytes are written as ``\\x1b``, ``\\n``, ``\\u202e``;
    everything else, non-Latin scripts included, is kept as it is."""
    out = []
    for ch in text:
        # Cs: lone surrogates, how Python carries the undecodable bytes of a file name; printing them raw fails
        if unicodedata.category(ch) in ("Cc", "Cs") or ch in _BIDI_CONTROLS:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)
