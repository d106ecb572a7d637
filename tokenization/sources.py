"""Where documents come from: inputs resolved to files, files cut into pieces of work, pieces read.

Inputs are the built-in corpus, files / directories / globs on any fsspec filesystem (local, s3://,
gs://, ...) in JSONL (plain or gzip), Parquet or text, or a Hugging Face Hub dataset (`hf:OWNER/NAME`,
resolved by `datasets` to its data files and read through the `hf://` filesystem).

Every document gets a fixed place in one global order, (piece, position in piece), and pieces are cut
from the files alone (never from the cluster size), so the output cannot depend on how many workers
ran or in which order they finished. A mixture (data.sources) is one job: its parts are planned in
config order, each piece tagged with its part, so the global order is (source, then as above).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec

from pipeline.core import storage
from pipeline.core.command import UserError, one_line
from pipeline.core.config import DataConfig
from tokenization import builtin

# Why a document was skipped; the manifest and the summary count each.
SKIP_REASONS = {
    "malformed_json": "malformed JSON",
    "missing_text": "text field missing",
    "non_string_text": "text field is not a string",
    "invalid_utf8": "invalid UTF-8",
    "empty": "empty document",
    "nul_bytes": "NUL bytes in text",
    "too_large": "document over tokenization.max_doc_bytes",
    "unreadable": "rest of a damaged file (truncated or corrupt compression)",
}

_SUFFIX_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet",
                   ".txt": "text", ".text": "text", ".md": "text"}
_GLOB_CHARS = re.compile(r"[*?\[]")


class CorpusError(UserError, ValueError):
    """An input that cannot be read as asked; the message names the file (and line)."""


@dataclass(frozen=True)
class InputFile:
    url: str
    format: str  # jsonl | parquet | text
    compressed: bool  # gzip
    size: int
    key: str  # changes whenever the file does (mtime or ETag based): part of the fingerprint


@dataclass(frozen=True)
class Source:
    kind: str  # builtin | files | hf
    files: tuple[InputFile, ...]
    info: dict  # what the manifest records about the source
    fingerprint: str
    ignored: tuple[str, ...] = ()  # files under a directory or glob whose format is unknown


@dataclass(frozen=True)
class Part:
    """What one job tokenizes from one source: its name (None for data.input alone), its data settings
    (data.* with the source's own input and overrides) and its resolved input."""

    name: str | None
    data: DataConfig
    source: Source


def resolve_parts(data: DataConfig) -> list[Part]:
    """Every source of data resolved, in config order; an error names the source's key."""
    parts = []
    for i, (name, settings) in enumerate(data.parts()):
        try:
            parts.append(Part(name, settings, resolve(settings)))
        except CorpusError as err:
            if name is None:
                raise
            # resolve names data.*'s keys; say which source's
            raise CorpusError(re.sub(r"\bdata\.(?=input|hf_|format|text_)", f"data.sources.{i}.", str(err))
                              + f" (source '{name}')") from None
    return parts


def resolve(data: DataConfig) -> Source:
    """Turn the configured inputs into a Source; fails before any work on missing or empty inputs."""
    inputs = data.input
    special = [i for i in inputs if i == "builtin" or i.startswith("hf:")]
    if special and len(inputs) > 1:
        raise CorpusError(f"data.input: '{special[0]}' cannot be combined with other inputs")
    if inputs == ["builtin"]:
        return Source("builtin", (), builtin.describe(), builtin.fingerprint())
    if not inputs:
        raise CorpusError("data.input: no input given")
    if inputs[0].startswith("hf:"):
        return _resolve_hf(inputs[0][3:], data)
    files, ignored = [], []
    for spec in inputs:
        found, skipped = _expand(spec, data.format)
        files += found
        ignored += skipped
    info = {"kind": "files", "inputs": list(inputs), "format": data.format, "text_field": data.text_field}
    return _with_files("files", files, info, ignored)


def _with_files(kind: str, files: list[InputFile], info: dict, ignored: list[str] = ()) -> Source:
    digest = hashlib.sha256(json.dumps([[f.url, f.size, f.key] for f in files]).encode()).hexdigest()
    listed = [{"path": f.url, "bytes": f.size} for f in files[:10_000]]
    info = {**info, "num_files": len(files), "bytes": sum(f.size for f in files), "files": listed}
    return Source(kind, tuple(files), info, digest, tuple(ignored))


def _expand(spec: str, fmt: str) -> tuple[list[InputFile], list[str]]:
    fs, path = storage.filesystem(spec)
    explicit = False
    if _GLOB_CHARS.search(path):
        paths = sorted(fs.glob(path))
        if not paths:
            raise CorpusError(f"input '{spec}' matches no files")
    elif fs.isdir(path):
        paths = sorted(fs.find(path))
        if not paths:
            raise CorpusError(f"input directory '{spec}' is empty")
    elif storage.is_local(spec) and os.path.exists(path) or fs.isfile(path):
        paths, explicit = [path], True
    else:
        raise CorpusError(f"input '{spec}' does not exist")
    files, ignored = [], []
    for p in paths:
        if fs.isdir(p):
            continue
        if storage.is_local(spec) and not stat.S_ISREG(os.stat(p).st_mode):  # a FIFO would hang the reader
            raise CorpusError(f"input '{p}' is not a regular file (a FIFO, device or socket); give files only")
        url = p if storage.is_local(spec) else fs.unstrip_protocol(p)
        kind = _format_of(p, fmt)
        if kind is None:
            if explicit:
                raise CorpusError(f"cannot tell the format of '{url}' from its name; set data.format")
            ignored.append(url)
            continue
        files.append(InputFile(url, kind, p.endswith(".gz"), fs.size(p), str(fs.ukey(p))))
    if not files:
        raise CorpusError(f"input '{spec}' holds no JSONL, Parquet or text files "
                          f"({len(ignored)} other files ignored)")
    return files, ignored


def _format_of(path: str, fmt: str) -> str | None:
    if fmt != "auto":
        return fmt
    name = path[:-3] if path.endswith(".gz") else path
    return _SUFFIX_FORMATS.get(name[name.rfind("."):].lower()) if "." in name else None


def _resolve_hf(name: str, data: DataConfig) -> Source:
    import datasets  # heavy; only Hub inputs need it

    try:
        builder = datasets.load_dataset_builder(name, data.hf_config, revision=data.hf_revision)
    except Exception as err:  # datasets raises many types; all mean the same to the user here
        raise CorpusError(f"data.input: cannot resolve Hugging Face dataset '{name}' "
                          f"(config {data.hf_config!r}, revision {data.hf_revision!r}): {err}") from err
    data_files = builder.config.data_files or {}
    if data.hf_split not in data_files:
        raise CorpusError(f"data.hf_split: '{data.hf_split}' not in dataset '{name}' "
                          f"(splits: {', '.join(map(str, data_files)) or 'none'})")
    files = []
    for url in data_files[data.hf_split]:
        fs, path = storage.filesystem(url)
        kind = _format_of(path, data.format)
        if kind is None:
            raise CorpusError(f"{url}: cannot tell the format of this data file; set data.format")
        files.append(InputFile(url, kind, path.endswith(".gz"), fs.size(path), str(fs.ukey(path))))
    info = {"kind": "hf", "repo": name, "config": data.hf_config, "split": data.hf_split,
            "revision": _hub_revision(name, data.hf_revision), "text_field": data.text_field}
    return _with_files("hf", files, info)


def _hub_revision(name: str, revision: str | None) -> str | None:
    """The commit the Hub resolves a dataset revision to; None for a local dataset directory."""
    if storage.exists(name):
        return None
    from huggingface_hub import HfApi

    return HfApi().dataset_info(name, revision=revision).sha


# --- pieces -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Span:
    """Part of one input: a byte range of a file (or the whole file), a row-group range of a
    Parquet file, or a range of built-in documents."""

    file: int  # index into Source.files; -1 for the built-in corpus
    start: int
    end: int


@dataclass(frozen=True)
class Piece:
    index: int
    spans: tuple[Span, ...]
    size: int = field(compare=False)  # approximate input bytes, for balancing only
    part: int = 0  # index into the job's parts (data.sources); its spans index that part's Source.files


def plan_parts(parts: list[Part], piece_bytes: int) -> list[Piece]:
    """Every part cut into pieces (plan), numbered in one sequence in config order."""
    pieces: list[Piece] = []
    for k, part in enumerate(parts):
        for p in plan(part.source, part.data, piece_bytes):
            pieces.append(Piece(len(pieces), p.spans, p.size, k))
    return pieces


def plan(source: Source, data: DataConfig, piece_bytes: int) -> list[Piece]:
    """Cut the source into pieces of about piece_bytes, from the files alone."""
    units: list[tuple[Span, int]] = []  # (span, bytes) in global order
    if source.kind == "builtin":
        units = [(Span(-1, i, i + 1), len(text)) for i, (_, text) in enumerate(builtin.documents())]
    for i, f in enumerate(source.files):
        if f.format == "parquet":
            units += _parquet_units(i, f, piece_bytes)
        elif _splittable(f, data):
            units += [(Span(i, s, min(s + piece_bytes, f.size)), min(piece_bytes, f.size - s))
                      for s in range(0, max(f.size, 1), piece_bytes)]
        else:
            units.append((Span(i, 0, f.size), f.size))
    pieces: list[Piece] = []
    spans, total = [], 0
    for span, nbytes in units:
        if spans and total + nbytes > piece_bytes:
            pieces.append(Piece(len(pieces), _merge(spans), total))
            spans, total = [], 0
        spans.append(span)
        total += nbytes
    if spans:
        pieces.append(Piece(len(pieces), _merge(spans), total))
    return pieces


def _merge(spans: list[Span]) -> tuple[Span, ...]:
    """Join adjacent built-in document ranges into one span."""
    out = [spans[0]]
    for s in spans[1:]:
        last = out[-1]
        if s.file == last.file == -1 and s.start == last.end:
            out[-1] = Span(-1, last.start, s.end)
        else:
            out.append(s)
    return tuple(out)


def _splittable(f: InputFile, data: DataConfig) -> bool:
    return not f.compressed and (f.format == "jsonl" or (f.format == "text" and data.text_unit == "line"))


def _parquet_units(i: int, f: InputFile, piece_bytes: int) -> list[tuple[Span, int]]:
    import pyarrow.parquet as pq

    try:
        with fsspec.open(f.url, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
    except Exception as err:  # pyarrow's ArrowInvalid (a ValueError), OSError: not a Parquet file we can read
        raise CorpusError(f"{f.url}: not a readable Parquet file ({type(err).__name__}: {one_line(err)}); "
                          f"remove it from data.input or repair it") from None
    units, start, nbytes = [], 0, 0
    for rg in range(meta.num_row_groups):
        size = meta.row_group(rg).total_byte_size
        if rg > start and nbytes + size > piece_bytes:
            units.append((Span(i, start, rg), nbytes))
            start, nbytes = rg, 0
        nbytes += size
    if meta.num_row_groups:
        units.append((Span(i, start, meta.num_row_groups), nbytes))
    return units


# --- reading ------------------------------------------------------------------------------------

@dataclass
class Doc:
    """One record read from a piece: a text to tokenize, or the reason it is skipped."""

    where: tuple[int, int]  # (span position in the piece, record number within the span)
    text: str | None
    utf8: bytes | None
    reason: str | None = None
    detail: str = ""


class PieceReader:
    """Iterates a piece's documents in order, validating each; `locate` names a record's file:line."""

    def __init__(self, source: Source, piece: Piece, data: DataConfig, max_doc_bytes: int):
        self.source, self.piece, self.data, self.max_doc_bytes = source, piece, data, max_doc_bytes
        self._line_base: dict[int, int] = {}  # span position -> lines before its first line
        self._first_line_at: dict[int, int] = {}  # span position -> byte offset of its first line

    def __iter__(self) -> Iterator[Doc]:
        for pos, span in enumerate(self.piece.spans):
            if span.file == -1:
                docs = builtin.documents()
                for k in range(span.start, span.end):
                    yield self._check((pos, k - span.start), docs[k][1])
                continue
            f = self.source.files[span.file]
            if f.format == "parquet":
                yield from self._parquet(pos, f, span)
            elif f.format == "jsonl":
                yield from self._readable(pos, f, (self._json_line((pos, k), line)
                                                   for k, line in enumerate(self._lines(pos, f, span))))
            elif self.data.text_unit == "line":
                yield from self._readable(pos, f, (self._decoded((pos, k), line.rstrip(b"\r\n"))
                                                   for k, line in enumerate(self._lines(pos, f, span))))
            else:
                yield from self._readable(pos, f, self._text_file(pos, f))

    @staticmethod
    def _readable(pos: int, f: InputFile, docs: Iterator[Doc]) -> Iterator[Doc]:
        """docs, until the file cannot be read further (a truncated or corrupt .gz): then one skipped record
        at the line where reading stopped, naming why; what was read before it stays."""
        k = -1
        try:
            for k, doc in enumerate(docs):
                yield doc
        except (EOFError, OSError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
            yield Doc((pos, k + 1), None, None, "unreadable", f"{type(err).__name__}: {err}")

    def locate(self, where: tuple[int, int]) -> str:
        pos, k = where
        span = self.piece.spans[pos]
        if span.file == -1:
            return f"builtin:{builtin.documents()[span.start + k][0]}"
        f = self.source.files[span.file]
        if f.format == "parquet":
            return f"{f.url}: row {self._parquet_row_base(f, span) + k + 1}"
        if f.format == "text" and self.data.text_unit == "file":
            return f.url
        if f.format == "text" and self.data.text_unit == "paragraph":
            return f"{f.url}:{k}"  # _text_file numbers paragraphs by their first line
        if pos not in self._line_base:
            self._line_base[pos] = self._count_lines_before(f, self._first_line_at.get(pos, span.start))
        return f"{f.url}:{self._line_base[pos] + k + 1}"

    # -- per format --

    def _lines(self, pos: int, f: InputFile, span: Span) -> Iterator[bytes]:
        """Lines whose first byte lies in [span.start, span.end): each line belongs to one piece."""
        compression = "gzip" if f.compressed else None
        with fsspec.open(f.url, "rb", compression=compression) as fh:
            offset = 0
            if span.start > 0:
                fh.seek(span.start - 1)
                offset = span.start - 1 + len(fh.readline())  # finish the line that began earlier
            self._first_line_at[pos] = offset
            while f.compressed or offset < span.end:
                line = fh.readline()
                if not line:
                    return
                offset += len(line)
                yield line

    def _count_lines_before(self, f: InputFile, offset: int) -> int:
        with fsspec.open(f.url, "rb") as fh:
            count, remaining = 0, offset
            while remaining > 0:
                block = fh.read(min(remaining, 8 << 20))
                if not block:
                    break
                count += block.count(b"\n")
                remaining -= len(block)
        return count

    def _json_line(self, where: tuple[int, int], line: bytes) -> Doc:
        try:
            raw = line.decode("utf-8")
        except UnicodeDecodeError as err:
            return Doc(where, None, None, "invalid_utf8", str(err))
        if not raw.strip():
            return Doc(where, None, None, "empty", "blank line")
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            return Doc(where, None, None, "malformed_json", str(err))
        except RecursionError:
            return Doc(where, None, None, "malformed_json", "nested too deeply")
        if not isinstance(record, dict):
            return Doc(where, None, None, "malformed_json", f"a JSON {type(record).__name__}, not an object")
        if self.data.text_field not in record or record[self.data.text_field] is None:
            return Doc(where, None, None, "missing_text", f"no '{self.data.text_field}' field")
        return self._check(where, record[self.data.text_field])

    def _decoded(self, where: tuple[int, int], raw: bytes) -> Doc:
        try:
            return self._check(where, raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            return Doc(where, None, None, "invalid_utf8", str(err))

    def _text_file(self, pos: int, f: InputFile) -> Iterator[Doc]:
        if not f.compressed and f.size > self.max_doc_bytes and self.data.text_unit == "file":
            yield Doc((pos, 0), None, None, "too_large", f"{f.size} bytes")
            return
        with fsspec.open(f.url, "rb", compression="gzip" if f.compressed else None) as fh:
            raw = fh.read()
        if self.data.text_unit == "file":
            yield self._decoded((pos, 0), raw)
            return
        line = 1
        for block in re.split(rb"(\n[ \t\r]*\n)", raw):  # paragraphs, separators kept for line counts
            if block.strip() and not re.fullmatch(rb"\n[ \t\r]*\n", block):
                yield self._decoded((pos, line), block.strip(b"\r\n"))
            line += block.count(b"\n")

    def _parquet(self, pos: int, f: InputFile, span: Span) -> Iterator[Doc]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        with fsspec.open(f.url, "rb") as fh:
            pf = pq.ParquetFile(fh)
            names = pf.schema_arrow.names
            k = 0
            for rg in range(span.start, span.end):
                rows = pf.metadata.row_group(rg).num_rows
                if self.data.text_field not in names:
                    for _ in range(rows):
                        yield Doc((pos, k), None, None, "missing_text",
                                  f"no '{self.data.text_field}' column (columns: {', '.join(names)})")
                        k += 1
                    continue
                column = pf.read_row_group(rg, columns=[self.data.text_field]).column(0)
                is_text = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
                for value in column.to_pylist():
                    if value is not None and not is_text:
                        yield Doc((pos, k), None, None, "non_string_text", f"column type {column.type}")
                    else:
                        yield self._check((pos, k), value)
                    k += 1

    def _parquet_row_base(self, f: InputFile, span: Span) -> int:
        import pyarrow.parquet as pq

        with fsspec.open(f.url, "rb") as fh:
            meta = pq.ParquetFile(fh).metadata
        return sum(meta.row_group(rg).num_rows for rg in range(span.start))

    def _check(self, where: tuple[int, int], value: object) -> Doc:
        if value is None:
            return Doc(where, None, None, "missing_text", f"'{self.data.text_field}' is null")
        if not isinstance(value, str):
            return Doc(where, None, None, "non_string_text", f"a {type(value).__name__}")
        if not value.strip():
            return Doc(where, None, None, "empty", "no text")
        if "\x00" in value:
            return Doc(where, None, None, "nul_bytes", f"NUL at character {value.index(chr(0))}")
        try:
            utf8 = value.encode("utf-8")
        except UnicodeEncodeError as err:  # lone surrogates from JSON \ud800-style escapes
            return Doc(where, None, None, "invalid_utf8", str(err))
        if len(utf8) > self.max_doc_bytes:
            return Doc(where, None, None, "too_large", f"{len(utf8)} bytes > {self.max_doc_bytes}")
        return Doc(where, value, utf8)
