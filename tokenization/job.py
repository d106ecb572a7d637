"""The tokenization stage: a corpus becomes token shards and a manifest, as a Ray Data job.

1. Pieces (Ray Data, an actor pool): each actor reads, validates and tokenizes whole pieces of the
   input and writes each piece's tokens and per-document (length, hash) to `_work/pieces/`, a JSON
   marker last. A re-run keeps every piece whose marker matches and whose files still hash right.
2. Plan (driver): the validation split is chosen by document hash; each split's documents, in global
   order, are cut into shards of about `shard_tokens` tokens (documents are never split).
3. Shards (Ray tasks): each shard is copied out of the pieces and written with its sha256.
The manifest is written last; then `_work/` is removed. Nothing here depends on the number of
workers, so any cluster produces the same bytes.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.core import cluster, storage
from pipeline.core.command import UserError
from pipeline.core.config import Config
from pipeline.core.progress import Progress, format_duration, human
from pipeline.core.storage import join
from tokenization import shards, sources, tokenizer
from tokenization.shards import MANIFEST, MANIFEST_VERSION, ShardError
from tokenization.sources import CorpusError, Piece, Source

WORK = "_work"
EXAMPLES_PER_REASON = 3
_PIECE_FORMAT = 1  # bump when what a piece holds changes, so old work is not reused
# Settings that only decide how the work is spread; they never change a byte of the output.
_RESOURCE_KEYS = ("output", "num_workers", "piece_bytes")


@dataclass
class TokenizeResult:
    output: str
    manifest: dict
    already_complete: bool  # nothing was done: the output was complete and matched
    seconds: float
    pieces_done: int
    pieces_reused: int
    shards_reused: int

    @property
    def tokens(self) -> int:
        return sum(t["tokens"] for t in self.manifest["totals"].values())


def run(cfg: Config, *, overwrite: bool = False, log=print) -> TokenizeResult:
    """Tokenize cfg.data into cfg.data_dir; returns once the manifest is written."""
    start = time.perf_counter()
    out = cfg.data_dir
    source = sources.resolve(cfg.data)  # a missing input fails here, before any Ray work
    tok_info = tokenizer.info()
    fingerprint = _dataset_fingerprint(cfg, source, tok_info)
    manifest_url = join(out, MANIFEST)

    if storage.exists(manifest_url):
        try:
            existing = shards.load_manifest(out)
        except ShardError:
            if not overwrite:
                raise  # a damaged manifest is named, never trusted
            existing = {}
        if existing.get("fingerprint") == fingerprint and not _missing_shards(out, existing):
            log(f"tokenize: {out} is complete and matches this input and config; nothing to do")
            return TokenizeResult(out, existing, True, time.perf_counter() - start, 0, 0, 0)
        if existing.get("fingerprint") != fingerprint and not overwrite:
            raise CorpusError(f"{out} holds a dataset from another input or config (fingerprint "
                              f"{existing.get('fingerprint', '?')[:12]}, now {fingerprint[:12]}); "
                              f"choose another output or overwrite it")
        storage.remove(manifest_url)  # the shards are rewritten below; the manifest comes last

    pieces = sources.plan(source, cfg.data, cfg.tokenization.piece_bytes)
    cluster.connect(cfg, (out,))
    results, reused = _tokenize_pieces(cfg, source, pieces, out)
    _check_results(results, cfg)
    plan = _plan_shards(cfg, results, out)
    shard_infos, shards_reused = _write_shards(plan, out)

    manifest = _manifest(cfg, source, tok_info, fingerprint, results, shard_infos)
    storage.write_json(manifest_url, manifest)
    _remove_stale(out, manifest)
    seconds = time.perf_counter() - start
    result = TokenizeResult(out, manifest, False, seconds, len(pieces) - reused, reused, shards_reused)
    _summary(result, log)
    return result


# --- fingerprints ---------------------------------------------------------------------------------

def fingerprint(cfg: Config) -> str:
    """What the dataset cfg describes would be: its input (as it is now), tokenizer and settings."""
    return _dataset_fingerprint(cfg, sources.resolve(cfg.data), tokenizer.info())


def complete(cfg: Config) -> bool:
    """Whether cfg.data_dir holds this very dataset, every shard present at its size."""
    if not storage.exists(join(cfg.data_dir, MANIFEST)):
        return False
    manifest = shards.load_manifest(cfg.data_dir)
    return manifest.get("fingerprint") == fingerprint(cfg) and not _missing_shards(cfg.data_dir, manifest)


def _output_config(cfg: Config) -> dict:
    """The settings that shape the output, as the manifest records them."""
    tok = {k: v for k, v in cfg.tokenization.model_dump().items() if k not in _RESOURCE_KEYS}
    return {"data": cfg.data.model_dump(), "tokenization": tok}


def _dataset_fingerprint(cfg: Config, source: Source, tok_info: dict) -> str:
    blob = {"source": source.fingerprint, "config": _output_config(cfg), "tokenizer": tok_info,
            "format": [MANIFEST_VERSION, _PIECE_FORMAT]}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _piece_fingerprint(cfg: Config, source: Source, piece: Piece) -> str:
    files = [source.files[s.file] for s in piece.spans if s.file >= 0]
    blob = {"spans": [[s.file, s.start, s.end] for s in piece.spans],
            "files": [[f.url, f.size, f.key] for f in files],
            "builtin": source.fingerprint if source.kind == "builtin" else None,
            "data": cfg.data.model_dump(), "max_doc_bytes": cfg.tokenization.max_doc_bytes,
            "tokenizer": cfg.tokenization.tokenizer, "format": _PIECE_FORMAT}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


# --- 1. pieces --------------------------------------------------------------------------------------

def _piece_urls(out: str, index: int) -> tuple[str, str, str]:
    base = join(out, WORK, "pieces", f"piece_{index:06d}")
    return f"{base}.bin", f"{base}.npz", f"{base}.json"


class PieceTokenizer:
    """A Ray Data actor: one GPT-2 encoder, many pieces."""

    def __init__(self, cfg: Config, source: Source, pieces: list[Piece], out: str):
        self.cfg, self.source, self.pieces, self.out = cfg, source, pieces, out
        self.encoder = tokenizer.encoding()

    def __call__(self, batch: dict) -> dict:
        results = []
        for i in batch["piece"]:
            try:
                results.append(self.piece(int(i)))
            except UserError as err:  # a full disk, storage past its retries: Ray Data would bury it in a traceback
                results.append({"piece": int(i), "user_error": str(err)})
        return {"result": np.array([json.dumps(r) for r in results], dtype=object)}

    def piece(self, index: int) -> dict:
        piece = self.pieces[index]
        fingerprint = _piece_fingerprint(self.cfg, self.source, piece)
        bin_url, npz_url, marker_url = _piece_urls(self.out, index)
        kept = _kept_piece(marker_url, bin_url, npz_url, fingerprint)
        if kept is not None:
            return {**kept, "reused": True}

        reader = sources.PieceReader(self.source, piece, self.cfg.data, self.cfg.tokenization.max_doc_bytes)
        arrays, hashes, skipped, examples = [], [], Counter(), []
        for doc in reader:
            if doc.reason is not None:
                skipped[doc.reason] += 1
                if skipped[doc.reason] <= EXAMPLES_PER_REASON:
                    examples.append({"where": reader.locate(doc.where), "reason": doc.reason, "detail": doc.detail})
                if self.cfg.tokenization.strict:
                    return {"piece": index, "error": _describe(examples[0])}
                continue
            arrays.append(self.encoder.encode_to_numpy(doc.text, disallowed_special=()))
            hashes.append(hashlib.blake2b(doc.utf8, digest_size=8).digest())

        lengths = np.fromiter((len(a) + 1 for a in arrays), dtype=np.uint32, count=len(arrays))
        tokens = np.empty(int(lengths.sum(dtype=np.int64)), dtype=shards.TOKEN_DTYPE)
        pos = 0
        for a in arrays:  # <|endoftext|> before every document
            tokens[pos] = tokenizer.EOT
            tokens[pos + 1:pos + 1 + len(a)] = a
            pos += len(a) + 1
        doc_hash = np.frombuffer(b"".join(hashes), dtype="<u8")
        index_bytes = io.BytesIO()
        np.savez(index_bytes, doc_tokens=lengths, doc_hash=doc_hash)
        marker = {"piece": index, "fingerprint": fingerprint, "documents": len(arrays),
                  "tokens": len(tokens), "skipped": dict(skipped), "examples": examples,
                  "tokens_sha256": shards.write_shard(bin_url, [tokens], len(tokens)),
                  "index_sha256": hashlib.sha256(index_bytes.getvalue()).hexdigest()}
        storage.write_bytes(npz_url, index_bytes.getvalue())
        storage.write_json(marker_url, marker)  # last: the piece counts as done only from here
        return {**marker, "reused": False}


def _kept_piece(marker_url: str, bin_url: str, npz_url: str, fingerprint: str) -> dict | None:
    """The marker of a piece finished by an earlier run, if it is for this piece and intact."""
    try:
        marker = storage.read_json(marker_url)
        if (marker.get("fingerprint") == fingerprint
                and shards.sha256_of(bin_url) == marker["tokens_sha256"]
                and hashlib.sha256(storage.read_bytes(npz_url)).hexdigest() == marker["index_sha256"]):
            return marker
    except (OSError, ValueError, KeyError):
        pass  # missing or damaged: tokenize the piece again
    return None


def _describe(example: dict) -> str:
    return f"{example['where']}: {sources.SKIP_REASONS[example['reason']]} ({example['detail']})"


def _tokenize_pieces(cfg: Config, source: Source, pieces: list[Piece], out: str) -> tuple[list[dict], int]:
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours below says more
    workers = min(cfg.tokenization.num_workers or cluster.cpus(), len(pieces))
    ds = ray.data.from_items([{"piece": p.index} for p in pieces], override_num_blocks=len(pieces))
    ds = ds.map_batches(PieceTokenizer, batch_size=1, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        fn_constructor_kwargs={"cfg": cfg, "source": source, "pieces": pieces, "out": out})
    results: dict[int, dict] = {}
    docs = toks = reused = 0
    progress = Progress("tokenize")
    progress.update(f"0/{len(pieces)} pieces on {workers} workers", force=True)
    for row in ds.iter_rows():
        r = json.loads(row["result"])
        if "error" in r:
            raise CorpusError(f"{r['error']} [tokenization.strict]")
        if "user_error" in r:
            raise UserError(r["user_error"])
        results[r["piece"]] = r
        docs += r["documents"]
        toks += r["tokens"]
        reused += r["reused"]
        rate = toks / max(progress.elapsed, 1e-9)
        progress.update(f"{len(results)}/{len(pieces)} pieces ({reused} kept) | {human(docs)} docs | "
                        f"{human(toks)} tokens | {human(rate)} tok/s")
    progress.done(f"{len(pieces)}/{len(pieces)} pieces ({reused} kept) | {human(docs)} docs | {human(toks)} tokens")
    return [results[p.index] for p in pieces], reused


def _check_results(results: list[dict], cfg: Config) -> None:
    if cfg.tokenization.strict:  # a kept piece may come from a non-strict run that skipped documents
        for r in results:
            if r["skipped"]:
                raise CorpusError(f"{_describe(r['examples'][0])} [tokenization.strict]")
    if not any(r["documents"] for r in results):
        skipped = Counter()
        for r in results:
            skipped.update(r["skipped"])
        raise CorpusError(f"no document could be tokenized ({_skip_text(skipped) or 'the input is empty'})")


# --- 2. plan ------------------------------------------------------------------------------------------

@dataclass
class ShardPlan:
    file: str
    split: str
    segments: np.ndarray  # (k, 3): piece, first token, end token
    tokens: int
    documents: int
    piece_urls: dict[int, str]


def _plan_shards(cfg: Config, results: list[dict], out: str) -> list[ShardPlan]:
    lengths, hashes, piece_of = [], [], []
    for r in results:
        index = np.load(io.BytesIO(storage.read_bytes(_piece_urls(out, r["piece"])[1])), allow_pickle=False)
        lengths.append(index["doc_tokens"].astype(np.int64))
        hashes.append(index["doc_hash"])
        piece_of.append(np.full(len(index["doc_tokens"]), r["piece"], dtype=np.int64))
    lengths_all = np.concatenate(lengths)
    hashes_all = np.concatenate(hashes)
    ends = np.concatenate([np.cumsum(n) for n in lengths])  # end of each document within its piece
    starts = ends - lengths_all
    pieces = np.concatenate(piece_of)
    val = _val_mask(hashes_all, lengths_all, cfg)

    plans = []
    for split, mask in (("train", ~val), ("val", val)):
        p, s, e = pieces[mask], starts[mask], ends[mask]
        cum = np.cumsum(e - s)
        first = number = 0
        while first < len(p):
            base = cum[first - 1] if first else 0
            # the longest run of documents that fits, and at least one
            last = max(first + 1, int(np.searchsorted(cum, base + cfg.tokenization.shard_tokens, side="right")))
            plans.append(_segments(split, number, p[first:last], s[first:last], e[first:last], out))
            first, number = last, number + 1
    return plans


def _val_mask(hashes: np.ndarray, lengths: np.ndarray, cfg: Config) -> np.ndarray:
    """Which documents are validation: decided by each document's content hash alone.

    With val_fraction f: hash < f * 2^64. With a val_tokens budget: the documents with the smallest
    hashes, whole groups of equal hashes at a time (duplicates stay together), within the budget.
    """
    tok = cfg.tokenization
    if tok.val_tokens is None:
        return hashes < np.uint64(min(int(tok.val_fraction * 2**64), 2**64 - 1))
    order = np.argsort(hashes, kind="stable")
    sorted_hashes, cum = hashes[order], np.cumsum(lengths[order])
    group_end = np.append(sorted_hashes[1:] != sorted_hashes[:-1], True)  # last doc of each hash group
    fits = group_end & (cum <= tok.val_tokens)
    if not fits.any():
        return np.zeros(len(hashes), dtype=bool)
    return hashes <= sorted_hashes[np.flatnonzero(fits)[-1]]


def _segments(split: str, number: int, p: np.ndarray, s: np.ndarray, e: np.ndarray, out: str) -> ShardPlan:
    # a new segment wherever the next document is not the continuation of the previous one
    breaks = np.flatnonzero((p[1:] != p[:-1]) | (s[1:] != e[:-1])) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(p)]]) - 1
    segments = np.stack([p[first], s[first], e[last]], axis=1)
    urls = {int(i): _piece_urls(out, int(i))[0] for i in np.unique(p)}
    return ShardPlan(f"{split}_{number:06d}.bin", split, segments, int((e - s).sum()), len(p), urls)


# --- 3. shards ------------------------------------------------------------------------------------------

def _write_shards(plans: list[ShardPlan], out: str) -> tuple[list[dict], int]:
    import ray

    write = ray.remote(num_cpus=1)(_write_shard)
    pending = [write.remote(plan, out) for plan in plans]
    progress = Progress("shards")
    infos, reused = [], 0
    for i, ref in enumerate(pending):
        info = ray.get(ref)
        reused += info.pop("reused")
        infos.append(info)
        progress.update(f"{i + 1}/{len(plans)} written")
    progress.done(f"{len(plans)} written ({reused} kept)")
    return infos, reused


def _write_shard(plan: ShardPlan, out: str) -> dict:
    url = join(out, plan.file)
    sidecar = join(out, WORK, "shards", plan.file + ".json")
    plan_hash = hashlib.sha256(plan.segments.tobytes() + json.dumps(
        [plan.piece_urls[int(i)] for i in plan.segments[:, 0]]).encode()).hexdigest()
    info = {"file": plan.file, "split": plan.split, "tokens": plan.tokens, "documents": plan.documents}
    try:
        kept = storage.read_json(sidecar)
        if kept["plan"] == plan_hash and shards.sha256_of(url) == kept["sha256"]:
            return {**info, "sha256": kept["sha256"], "reused": True}
    except (OSError, ValueError, KeyError):
        pass
    opened: dict[int, np.ndarray] = {}

    def chunks():
        for piece, first, end in plan.segments:
            if piece not in opened:
                opened.clear()  # segments come in piece order: one piece open at a time
                opened[piece] = shards.read_tokens(plan.piece_urls[int(piece)])
            yield opened[piece][first:end]

    digest = shards.write_shard(url, chunks(), plan.tokens)
    storage.write_json(sidecar, {"plan": plan_hash, "sha256": digest})
    return {**info, "sha256": digest, "reused": False}


# --- manifest, clean-up, summary -----------------------------------------------------------------

def _manifest(cfg: Config, source: Source, tok_info: dict, fingerprint: str,
              results: list[dict], shard_infos: list[dict]) -> dict:
    skipped, examples, shown = Counter(), [], Counter()
    for r in results:
        skipped.update(r["skipped"])
        for e in r["examples"]:  # the first few of each reason, in input order
            shown[e["reason"]] += 1
            if shown[e["reason"]] <= EXAMPLES_PER_REASON:
                examples.append(e)
    totals = {split: {"tokens": sum(s["tokens"] for s in shard_infos if s["split"] == split),
                      "documents": sum(s["documents"] for s in shard_infos if s["split"] == split),
                      "shards": sum(1 for s in shard_infos if s["split"] == split)}
              for split in shards.SPLITS}
    tok = cfg.tokenization
    rule = (f"val if blake2b-64(UTF-8 text) < {tok.val_fraction} * 2^64" if tok.val_tokens is None else
            f"val = documents with the smallest blake2b-64(UTF-8 text), equal hashes together, "
            f"within {tok.val_tokens} tokens")
    return {
        "format_version": MANIFEST_VERSION,
        "shard_format": {"header": "llm.c", "magic": shards.MAGIC, "version": shards.VERSION,
                         "header_bytes": shards.HEADER_BYTES, "dtype": "uint16 little-endian",
                         "document_separator": "<|endoftext|> (50256) before every document"},
        "fingerprint": fingerprint,
        "tokenizer": tok_info,
        "source": {**source.info, "fingerprint": source.fingerprint},
        "split": {"rule": rule, "hash": "blake2b, 8-byte digest, read little-endian",
                  "val_fraction": tok.val_fraction if tok.val_tokens is None else None,
                  "val_tokens": tok.val_tokens},
        "shards": shard_infos,
        "totals": totals,
        "input_documents": sum(r["documents"] for r in results) + sum(skipped.values()),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "config": _output_config(cfg),
    }


def _missing_shards(out: str, manifest: dict) -> list[str]:
    """Shards the manifest names that are absent or of the wrong size (a cheap check; see verify)."""
    missing = []
    for info in shards.shards(manifest):
        url = join(out, info.file)
        if not storage.exists(url) or storage.size(url) != shards.HEADER_BYTES + 2 * info.tokens:
            missing.append(info.file)
    return missing


def _remove_stale(out: str, manifest: dict) -> None:
    listed = {s["file"] for s in manifest["shards"]}
    for name in storage.listdir(out):
        if name.endswith(".bin") and name.split("_")[0] in shards.SPLITS and name not in listed:
            storage.remove(join(out, name))
    storage.remove(join(out, WORK), recursive=True)


def _skip_text(skipped: Counter | dict) -> str:
    return ", ".join(f"{n} {sources.SKIP_REASONS[r]}" for r, n in sorted(skipped.items()))


def _summary(result: TokenizeResult, log) -> None:
    m = result.manifest
    log(f"tokenize: {m['source']['kind']} source -> {result.output}")
    for split, t in m["totals"].items():
        log(f"  {split:5s} {t['tokens']:>14,} tokens {t['documents']:>11,} documents {t['shards']:>5} shards")
    if m["skipped"]:
        log(f"  skipped {sum(m['skipped'].values()):,} of {m['input_documents']:,} documents: "
            f"{_skip_text(m['skipped'])}")
        for e in m["skipped_examples"]:
            log(f"    e.g. {_describe(e)}")
    else:
        log(f"  skipped 0 of {m['input_documents']:,} documents")
    log(f"  {format_duration(result.seconds)} ({result.seconds:.1f} s), "
        f"{human(result.tokens / max(result.seconds, 1e-9))} tokens/s; pieces: {result.pieces_done} "
        f"tokenized, {result.pieces_reused} kept from an earlier run; shards kept: {result.shards_reused}")


def verify(dataset_dir: str, log=print) -> bool:
    """Re-hash every shard against the manifest; print and return whether all are intact."""
    try:
        failures = shards.verify(dataset_dir)
    except ShardError as err:
        log(f"verify: {err}")
        return False
    count = len(shards.load_manifest(dataset_dir)["shards"])
    for line in failures:
        log(f"verify: FAILED {line}")
    log(f"verify: {count - len(failures)}/{count} shards intact in {dataset_dir}")
    return not failures

