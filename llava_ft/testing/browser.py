"""Headless chromium for the web demo's browser test and the README screenshot (Debian's package, driven by
Playwright through `executable_path`; no browser download)."""

from __future__ import annotations

import os

# This machine's network is closed: without the background-networking flags chromium keeps dialling out.
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    for candidate in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None
