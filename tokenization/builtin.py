"""The built-in corpus: English prose that ships with every Python installation, no download needed.

One document per `pydoc_data` help topic, and one per standard-library module holding all of that
module's docstrings (read with `ast`, so no module is imported and nothing runs). About 2 MB of text.
It is the same on every machine with the same Python version, so every Ray worker can rebuild it
locally; the result is cached on disk per Python version.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path

from pipeline.core import storage

_EXTRACTOR_VERSION = 1  # bump when the extraction below changes, to invalidate caches
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "turtledemo"}


def _extract() -> list[tuple[str, str]]:
    import pydoc_data.topics

    docs = [(f"pydoc_data.topics:{name}", pydoc_data.topics.topics[name])
            for name in sorted(pydoc_data.topics.topics)]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if _SKIP_DIRS.intersection(rel.parts) or rel.parts[0].startswith("config-"):
            continue
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):  # lib2to3 test data and the like
            continue
        parts = [ast.get_docstring(node) for node in ast.walk(tree)
                 if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(p for p in parts if p)
        if text:
            docs.append((f"stdlib:{rel.as_posix()}", text))
    return docs


def _cache_path() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gpt2-pipeline"
    version = ".".join(map(str, sys.version_info[:3]))
    return base / f"builtin-corpus-py{version}-v{_EXTRACTOR_VERSION}.json"


@lru_cache(maxsize=1)
def documents() -> tuple[tuple[str, str], ...]:
    """(name, text) of every built-in document, in a fixed order."""
    cache = _cache_path()
    try:
        return tuple(map(tuple, json.loads(cache.read_text())))
    except (OSError, ValueError):
        docs = _extract()
        try:
            storage.write_json(str(cache), docs)
        except OSError:
            pass  # a read-only home only costs the extraction again
        return tuple(docs)


def fingerprint() -> str:
    digest = hashlib.sha256()
    for name, text in documents():
        digest.update(name.encode() + b"\0" + text.encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()


def describe() -> dict:
    return {"kind": "builtin", "python": sys.version.split()[0], "documents": len(documents()),
            "description": "pydoc_data help topics and standard-library docstrings"}
