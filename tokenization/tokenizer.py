"""GPT-2's BPE through tiktoken, and the identity of its vocabulary files for the manifest."""

from __future__ import annotations

import hashlib
from functools import lru_cache

import tiktoken
import tiktoken.load

from pipeline.core.command import UserError

EOT = 50256
_VOCAB_URLS = {  # the files tiktoken's "gpt2" encoding is built from (and checks by sha256)
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


class TokenizerUnavailable(UserError, RuntimeError):
    pass


@lru_cache(maxsize=1)
def encoding() -> tiktoken.Encoding:
    try:
        enc = tiktoken.get_encoding("gpt2")
    except Exception as err:  # network errors surface as many types
        raise TokenizerUnavailable(
            "cannot load GPT-2's vocabulary: tiktoken downloads vocab.bpe and encoder.json on first use "
            "and caches them in $TIKTOKEN_CACHE_DIR; on a machine without internet, point "
            f"TIKTOKEN_CACHE_DIR at a folder holding them ({type(err).__name__}: {err})") from err
    assert enc.eot_token == EOT
    return enc


@lru_cache(maxsize=1)
def info() -> dict:
    encoding()  # fetches (or finds) the files
    files = {name: hashlib.sha256(tiktoken.load.read_file_cached(url)).hexdigest()
             for name, url in _VOCAB_URLS.items()}
    return {"name": "gpt2", "library": f"tiktoken {tiktoken.__version__}", "vocab_size": 50257,
            "eot_token": EOT, "files_sha256": files}
