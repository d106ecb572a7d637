"""Credentials never leave in a message: the user:password (or token) of any URL in a text is replaced by
***, wherever a URI is printed, logged or stored (tracking URIs, storage URLs, the config as MLflow params).
Imports nothing, so every module may use it."""

from __future__ import annotations

import re

_CREDENTIALS = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")


def redact(text: str) -> str:
    """text with the user:password (or token) of every URL in it replaced by ***: a credential in a
    tracking or storage URI is never printed, logged or stored."""
    return _CREDENTIALS.sub(r"\1***@", text)
