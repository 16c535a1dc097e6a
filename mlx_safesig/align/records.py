"""Rows as the data builder stores them: normalized text, its id, its source. No registry here, so
the reader modules (``sources``, ``sources_more``) and ``translate`` share one way of making a row
without importing each other; the builder adds each row's license from the registry
(``sources.licensed``)."""

from __future__ import annotations

import hashlib
import re
import unicodedata


def normalize(text: str) -> str:
    """Text as stored: NFC; per line, whitespace runs collapsed and stripped; at most one blank line."""
    lines = [" ".join(ln.split()) for ln in unicodedata.normalize("NFC", text).splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def dedup_key(text: str) -> str:
    """Key used for dedup and ids: NFKC, case-folded, whitespace-collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def text_id(text: str) -> str:
    """A row's id: the first 12 hex digits of sha256(dedup_key(text))."""
    return hashlib.sha256(dedup_key(text).encode("utf-8")).hexdigest()[:12]


def make_row(text: str, source: str, **extra) -> dict:
    """A raw row of ``source``: normalized ``text``, its id, then ``extra`` fields (``label``,
    ``category``, ...)."""
    t = normalize(text)
    return {"id": text_id(t), "text": t, "source": source, **extra}


def row_messages(row: dict) -> list:
    """The chat messages a row asks (and is judged as): its ``messages`` (a conversation), else
    one user turn of its ``text``."""
    if "messages" in row:
        return row["messages"]
    return [{"role": "user", "content": row["text"]}]
