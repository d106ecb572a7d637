"""The tokenization stage: a corpus becomes token shards and a manifest, as a Ray Data job.

1. Pieces (Ray Data, an actor pool): each actor reads, validates and tokenizes whole pieces of the
   input and writes each piece's tokens and per-document (length, hash) to `_work/pieces/`, a JSON
   marker last. A re-run keeps every piece whose marker matches and whose files still hash right.
2. Plan (driver): the validation split is chosen by document hash; each split's documents, in global
   order, are cut into shards of about `shard_tokens` tokens (documents are never split).
3. Shards (Ray tasks): each shard is copied out of the pieces and written with its sha256.
The manifest is written last; then `_work/` is removed. Nothing here depends on the number of
workers, so any cluster produces the same bytes.

A mixture (data.sources) is the same one job: every source's pieces in one sequence (source in config
order), curation and the split over the whole corpus (a document in two sources is kept in the first),
shards cut per source and split (SOURCE-SPLIT_NNNNNN.bin). The sources' weights and epoch caps are for
training to read from the config: they change no byte here, so changing them re-tokenizes nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from pipeline.core import cluster, storage
from pipeline.core.command import UserError, one_line
from pipeline.core.config import SOURCE_NAME, Config
from pipeline.core.progress import Progress, format_duration, human
from pipeline.core.storage import join
from tokenization import contamination, curate, dedup, quality, shards, sources, tokenizer
from tokenization.contamination import EvalIndex
from tokenization.curate import Curator
from tokenization.shards import MANIFEST, MANIFEST_VERSION, ShardError
from tokenization.sources import CorpusError, Part, Piece

WORK = "_work"
EXAMPLES_PER_REASON = 3
_PIECE_FORMAT = 3  # bump when what a piece holds changes, so old work is not reused
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
    parts = sources.resolve_parts(cfg.data)  # a missing input fails here, before any Ray work
    tok_info = tokenizer.info()
    fingerprint = _dataset_fingerprint(cfg, parts, tok_info)
    index, unchecked = _eval_index(cfg, log)
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
        changed = _changed_settings(existing.get("config", {}), _output_config(cfg))
        if existing.get("fingerprint") != fingerprint and not overwrite:
            raise CorpusError(f"{out} holds a dataset from another input or config (fingerprint "
                              f"{existing.get('fingerprint', '?')[:12]}, now {fingerprint[:12]}"
                              f"{'; changed: ' + changed if changed else ''}); choose another output or overwrite it")
        if changed:
            log(f"tokenize: {out} is redone for changed settings: {changed}")
        storage.remove(manifest_url)  # the shards are rewritten below; the manifest comes last

    pieces = sources.plan_parts(parts, cfg.tokenization.piece_bytes)
    cluster.connect(cfg, (out,))
    results, reused = _tokenize_pieces(cfg, parts, pieces, out, index)
    _check_results(results, cfg)
    plan, curation = _plan_shards(cfg, parts, pieces, results, out)
    curation["contamination"] = _contamination_record(cfg, index, unchecked, curation["contamination"])
    shard_infos, shards_reused = _write_shards(plan, out)

    manifest = _manifest(cfg, parts, tok_info, fingerprint, results, shard_infos, curation)
    storage.write_json(manifest_url, manifest)
    _remove_stale(out, manifest)
    seconds = time.perf_counter() - start
    result = TokenizeResult(out, manifest, False, seconds, len(pieces) - reused, reused, shards_reused)
    _summary(result, log)
    return result


# --- fingerprints ---------------------------------------------------------------------------------

def fingerprint(cfg: Config) -> str:
    """What the dataset cfg describes would be: its input (as it is now), tokenizer and settings."""
    return _dataset_fingerprint(cfg, sources.resolve_parts(cfg.data), tokenizer.info())


def complete(cfg: Config) -> bool:
    """Whether cfg.data_dir holds this very dataset, every shard present at its size."""
    if not storage.exists(join(cfg.data_dir, MANIFEST)):
        return False
    manifest = shards.load_manifest(cfg.data_dir)
    return manifest.get("fingerprint") == fingerprint(cfg) and not _missing_shards(cfg.data_dir, manifest)


def _output_config(cfg: Config) -> dict:
    """The settings that shape the output, as the manifest records them. Of data.sources, not the weights
    and epoch caps: training reads those, and changing them must not redo the dataset. Without sources the
    key is left out (such a dataset's manifest reads as before sources existed); with them, data.input is
    (unused)."""
    tok = {k: v for k, v in cfg.tokenization.model_dump().items() if k not in _RESOURCE_KEYS}
    exclude = ({"input": True, "sources": {"__all__": {"weight", "max_epochs"}}} if cfg.data.sources
               else {"sources"})
    return {"data": cfg.data.model_dump(exclude=exclude), "tokenization": tok}


def _changed_settings(before: dict, now: dict) -> str:
    """'section.key (old -> new)' for each output setting that differs, e.g. a re-run with dedup off."""
    flat = lambda d: {f"{section}.{k}": v for section, values in d.items() for k, v in values.items()}  # noqa: E731
    old, new = flat(before), flat(now)
    return ", ".join(f"{k} ({old.get(k)!r} -> {new.get(k)!r})" for k in sorted(set(old) | set(new))
                     if old.get(k) != new.get(k))


def _dataset_fingerprint(cfg: Config, parts: list[Part], tok_info: dict) -> str:
    inputs = ([[p.name, p.source.fingerprint] for p in parts] if cfg.data.sources else parts[0].source.fingerprint)
    blob = {"source": inputs, "config": _output_config(cfg), "tokenizer": tok_info,
            "format": [MANIFEST_VERSION, _PIECE_FORMAT], "eval": _eval_identity(cfg)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _piece_fingerprint(cfg: Config, part: Part, piece: Piece, index: EvalIndex | None) -> str:
    source = part.source
    files = [source.files[s.file] for s in piece.spans if s.file >= 0]
    blob = {"spans": [[s.file, s.start, s.end] for s in piece.spans],
            "files": [[f.url, f.size, f.key] for f in files],
            "builtin": source.fingerprint if source.kind == "builtin" else None,
            "data": part.data.model_dump(exclude={"sources"}), "max_doc_bytes": cfg.tokenization.max_doc_bytes,
            "tokenizer": cfg.tokenization.tokenizer, "format": _PIECE_FORMAT, **_piece_curation(cfg, index)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def _piece_curation(cfg: Config, index: EvalIndex | None) -> dict:
    """The curation settings a piece's own output depends on (the corpus-wide choices come later, in the
    plan): changing any other one (dedup, decontaminate drop/count) reuses every piece, except switching
    all curation off or on (plain tokenization computes no keys)."""
    tok = cfg.tokenization
    return {"keys": curate.any_curation(tok, index), "quality": tok.quality.model_dump() if tok.quality.enabled else None,
            "near_dedup": [tok.near_dedup_ngram, tok.near_dedup_bands, tok.near_dedup_rows] if tok.near_dedup else None,
            "eval": [index.sha256, index.n] if index else None}


def _eval_identity(cfg: Config) -> dict | None:
    """What the contamination check reads, for the dataset's fingerprint (official: the one released file)."""
    tok, spec = cfg.tokenization, cfg.eval.hellaswag
    if tok.decontaminate == "off" or not spec:
        return None
    path = str(contamination.SMOKE) if spec == "smoke" else spec
    digest = None if spec == "official" else hashlib.sha256(storage.read_bytes(path)).hexdigest()
    return {"spec": spec, "sha256": digest, "ngram": tok.decontaminate_ngram}


def _eval_index(cfg: Config, log) -> tuple[EvalIndex | None, str | None]:
    """The eval items' n-gram index, or (None, why not). With `drop`, an eval set that cannot be read stops
    the job; with `count` the manifest says it was not checked."""
    tok, spec = cfg.tokenization, cfg.eval.hellaswag
    if tok.decontaminate == "off":
        return None, "tokenization.decontaminate=off"
    if not spec:
        return None, "no eval set (eval.hellaswag is unset)"
    try:
        return EvalIndex(spec, tok.decontaminate_ngram), None
    except CorpusError:  # the file is there but is not HellaSwag: named, in every mode
        raise
    except Exception as err:  # the Hub offline, a missing file: one line, named
        why = f"cannot read the HellaSwag items ({spec}): {type(err).__name__}: {one_line(err)}"
        if tok.decontaminate == "drop":
            raise CorpusError(f"tokenization.decontaminate=drop: {why}") from None
        log(f"tokenize: contamination not checked: {why}")
        return None, why


# --- 1. pieces --------------------------------------------------------------------------------------

def _piece_urls(out: str, index: int) -> tuple[str, str, str]:
    base = join(out, WORK, "pieces", f"piece_{index:06d}")
    return f"{base}.bin", f"{base}.npz", f"{base}.json"


class PieceTokenizer:
    """A Ray Data actor: one GPT-2 encoder, many pieces."""

    def __init__(self, cfg: Config, parts: list[Part], pieces: list[Piece], out: str, index: EvalIndex | None):
        self.cfg, self.parts, self.pieces, self.out, self.index = cfg, parts, pieces, out, index
        self.encoder = tokenizer.encoding()
        self.curator = Curator(cfg.tokenization, index)

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
        part = self.parts[piece.part]
        fingerprint = _piece_fingerprint(self.cfg, part, piece, self.index)
        bin_url, npz_url, marker_url = _piece_urls(self.out, index)
        kept = _kept_piece(marker_url, bin_url, npz_url, fingerprint)
        if kept is not None:
            return {**kept, "reused": True}

        tok = self.cfg.tokenization
        reader = sources.PieceReader(part.source, piece, part.data, tok.max_doc_bytes)
        arrays, hashes, skipped, examples = [], [], Counter(), []
        keys, bands, filtered, filtered_examples, contaminated = [], [], Counter(), [], []
        batch: list[sources.Doc] = []

        def take(docs: list[sources.Doc]) -> None:
            if docs and self.curator.active:
                curated = self.curator([d.text for d in docs], [d.utf8 for d in docs])
                for doc, rule in zip(docs, curated.failed):
                    if rule is not None:
                        filtered[rule] += 1
                        if filtered[rule] <= EXAMPLES_PER_REASON:
                            filtered_examples.append({"where": reader.locate(doc.where), "rule": rule})
                docs = [d for d, rule in zip(docs, curated.failed) if rule is None]
                contaminated.extend([len(arrays) + d, items] for d, items in curated.touched.items())
                keys.append(curated.keys)
                bands.append(curated.bands)
            for doc in docs:
                arrays.append(self.encoder.encode_to_numpy(doc.text, disallowed_special=()))
                hashes.append(hashlib.blake2b(doc.utf8, digest_size=8).digest())

        batched = 0
        for doc in reader:
            if doc.reason is not None:
                skipped[doc.reason] += 1
                if skipped[doc.reason] <= EXAMPLES_PER_REASON:
                    examples.append({"where": reader.locate(doc.where), "reason": doc.reason, "detail": doc.detail})
                if tok.strict:
                    return {"piece": index, "error": _describe(examples[0])}
                continue
            batch.append(doc)
            batched += len(doc.utf8)
            if batched >= curate.BATCH_BYTES or len(batch) >= curate.BATCH_DOCUMENTS:
                take(batch)
                batch, batched = [], 0
        take(batch)

        lengths = np.fromiter((len(a) + 1 for a in arrays), dtype=np.uint32, count=len(arrays))
        tokens = np.empty(int(lengths.sum(dtype=np.int64)), dtype=shards.TOKEN_DTYPE)
        pos = 0
        for a in arrays:  # <|endoftext|> before every document
            tokens[pos] = tokenizer.EOT
            tokens[pos + 1:pos + 1 + len(a)] = a
            pos += len(a) + 1
        doc_hash = np.frombuffer(b"".join(hashes), dtype="<u8")
        widths = (2 if self.curator.active else 0, tok.near_dedup_bands if tok.near_dedup else 0)
        doc_key, doc_bands = (np.concatenate([np.zeros((0 if parts else len(arrays), width), dtype="<u8"), *parts])
                              for width, parts in zip(widths, (keys, bands)))
        index_bytes = io.BytesIO()
        np.savez(index_bytes, doc_tokens=lengths, doc_hash=doc_hash, doc_key=doc_key, doc_bands=doc_bands)
        marker = {"piece": index, "fingerprint": fingerprint, "documents": len(arrays),
                  "tokens": len(tokens), "skipped": dict(skipped), "examples": examples,
                  "filtered": dict(filtered), "filtered_examples": filtered_examples, "contaminated": contaminated,
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


def _tokenize_pieces(cfg: Config, parts: list[Part], pieces: list[Piece], out: str,
                     index: EvalIndex | None) -> tuple[list[dict], int]:
    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False  # ours below says more
    workers = min(cfg.tokenization.num_workers or cluster.cpus(), len(pieces))
    ds = ray.data.from_items([{"piece": p.index} for p in pieces], override_num_blocks=len(pieces))
    ds = ds.map_batches(PieceTokenizer, batch_size=1, num_cpus=1,
                        compute=ray.data.ActorPoolStrategy(size=workers),
                        fn_constructor_kwargs={"cfg": cfg, "parts": parts, "pieces": pieces, "out": out,
                                               "index": index})
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
    source: str | None  # the data.sources name, None without sources
    segments: np.ndarray  # (k, 3): piece, first token, end token
    tokens: int
    documents: int
    piece_urls: dict[int, str]


def _plan_shards(cfg: Config, parts: list[Part], pieces_planned: list[Piece], results: list[dict],
                 out: str) -> tuple[list[ShardPlan], dict]:
    """The shards, and what curation removed or found (the manifest's `curation`)."""
    lengths, hashes, piece_of, keys, contaminated = [], [], [], [], []
    offset = 0
    for r in results:
        index = np.load(io.BytesIO(storage.read_bytes(_piece_urls(out, r["piece"])[1])), allow_pickle=False)
        lengths.append(index["doc_tokens"].astype(np.int64))
        hashes.append(index["doc_hash"])
        keys.append(index["doc_key"])
        piece_of.append(np.full(len(index["doc_tokens"]), r["piece"], dtype=np.int64))
        contaminated += [(offset + doc, items) for doc, items in r["contaminated"]]
        offset += len(index["doc_tokens"])
    lengths_all = np.concatenate(lengths)
    hashes_all = np.concatenate(hashes)
    ends = np.concatenate([np.cumsum(n) for n in lengths])  # end of each document within its piece
    starts = ends - lengths_all
    pieces = np.concatenate(piece_of)
    part_of = np.array([p.part for p in pieces_planned], dtype=np.int64)[pieces]

    tok = cfg.tokenization
    exact = dedup.exact_duplicates(np.concatenate(keys)) if tok.dedup else np.zeros(offset, dtype=bool)
    near = (dedup.near_duplicates([_piece_urls(out, r["piece"])[1] for r in results], ~exact, tok.near_dedup_bands)
            if tok.near_dedup else np.zeros(offset, dtype=bool))
    kept = ~exact & ~near
    val = np.zeros(offset, dtype=bool)
    val[kept] = _val_mask(hashes_all[kept], lengths_all[kept], cfg)
    # contamination is of what the model trains on: the documents of the train split that stay
    found = [(doc, items) for doc, items in contaminated if kept[doc] and not val[doc]]
    docs = np.array([doc for doc, _ in found], dtype=np.int64)
    if tok.decontaminate == "drop":
        kept[docs] = False
    curation = {
        "exact_duplicates": _removed(exact, lengths_all, tok.dedup),
        "near_duplicates": _removed(near, lengths_all, tok.near_dedup),
        "contamination": {"documents": len(found), "tokens": int(lengths_all[docs].sum()),
                          "items_touched": sorted({i for _, items in found for i in items})},
    }

    plans = []
    for k, part in enumerate(parts):  # per source (one part without data.sources), in config order
        in_part = part_of == k
        if part.name is not None and not (kept & ~val & in_part).any():
            raise CorpusError(f"data.sources.{k} ('{part.name}'): no training document is left after skipping, "
                              f"curation and the validation split, so training cannot draw from it")
        for split, mask in (("train", kept & ~val & in_part), ("val", kept & val & in_part)):
            p, s, e = pieces[mask], starts[mask], ends[mask]
            cum = np.cumsum(e - s)
            first = number = 0
            while first < len(p):
                base = cum[first - 1] if first else 0
                # the longest run of documents that fits, and at least one
                last = max(first + 1, int(np.searchsorted(cum, base + cfg.tokenization.shard_tokens, side="right")))
                plans.append(_segments(part.name, split, number, p[first:last], s[first:last], e[first:last], out))
                first, number = last, number + 1
    return plans, curation


def _removed(mask: np.ndarray, lengths: np.ndarray, enabled: bool) -> dict:
    return {"enabled": enabled, "documents": int(mask.sum()), "tokens": int(lengths[mask].sum())}


def _contamination_record(cfg: Config, index: EvalIndex | None, unchecked: str | None, found: dict) -> dict:
    mode = cfg.tokenization.decontaminate
    if index is None:
        return {"checked": False, "mode": mode, "why": unchecked}
    touched = found["items_touched"]
    return {"checked": True, "mode": mode, **index.describe(), "train_documents": found["documents"],
            "train_tokens": found["tokens"], "dropped": mode == "drop", "items_touched": touched,
            "items_touched_count": len(touched), "items_touched_share": len(touched) / max(index.items, 1)}


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


def _segments(source: str | None, split: str, number: int, p: np.ndarray, s: np.ndarray, e: np.ndarray,
              out: str) -> ShardPlan:
    # a new segment wherever the next document is not the continuation of the previous one
    breaks = np.flatnonzero((p[1:] != p[:-1]) | (s[1:] != e[:-1])) + 1
    first = np.concatenate([[0], breaks])
    last = np.concatenate([breaks, [len(p)]]) - 1
    segments = np.stack([p[first], s[first], e[last]], axis=1)
    urls = {int(i): _piece_urls(out, int(i))[0] for i in np.unique(p)}
    return ShardPlan(shard_name(source, split, number), split, source, segments, int((e - s).sum()), len(p), urls)


def shard_name(source: str | None, split: str, number: int) -> str:
    return f"{split}_{number:06d}.bin" if source is None else f"{source}-{split}_{number:06d}.bin"


# what shard_name makes, for removing shards a re-run no longer lists (and nothing else of the directory)
_SHARD_NAME = re.compile(rf"^(?:{SOURCE_NAME.pattern.strip('^$')}-)?(?:{'|'.join(shards.SPLITS)})_\d{{6}}\.bin$")


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
    info = {"file": plan.file, "split": plan.split, "tokens": plan.tokens, "documents": plan.documents,
            **({"source": plan.source} if plan.source is not None else {})}
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

def _manifest(cfg: Config, parts: list[Part], tok_info: dict, fingerprint: str,
              results: list[dict], shard_infos: list[dict], curation: dict) -> dict:
    skipped, examples = _counted(results, "skipped", "examples", "reason")
    filtered, filtered_examples = _counted(results, "filtered", "filtered_examples", "rule")
    totals = _split_counts(shard_infos)
    mixture = bool(cfg.data.sources)  # without data.sources the manifest is as it always was
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
        "source": {"kind": "mixture", "sources": [p.name for p in parts]} if mixture else _input_info(parts[0]),
        **({"sources": _sources_record(parts, shard_infos)} if mixture else {}),
        "split": {"rule": rule, "hash": "blake2b, 8-byte digest, read little-endian",
                  "val_fraction": tok.val_fraction if tok.val_tokens is None else None,
                  "val_tokens": tok.val_tokens},
        "shards": shard_infos,
        "totals": totals,
        "input_documents": sum(r["documents"] for r in results) + sum(skipped.values()) + sum(filtered.values()),
        "skipped": dict(sorted(skipped.items())),
        "skipped_examples": examples,
        "curation": {**curation, "quality": {"enabled": cfg.tokenization.quality.enabled,
                                             "failed": dict(sorted(filtered.items())),
                                             "examples": filtered_examples}},
        "config": _output_config(cfg),
    }


def _split_counts(shard_infos: list[dict]) -> dict:
    """{split: {tokens, documents, shards}} of these shards."""
    return {split: {"tokens": sum(s["tokens"] for s in shard_infos if s["split"] == split),
                    "documents": sum(s["documents"] for s in shard_infos if s["split"] == split),
                    "shards": sum(1 for s in shard_infos if s["split"] == split)}
            for split in shards.SPLITS}


def _sources_record(parts: list[Part], shard_infos: list[dict]) -> list[dict]:
    """The manifest's `sources`: each source's input and its documents, tokens and shards per split."""
    out = []
    for part in parts:
        counts = _split_counts([s for s in shard_infos if s["source"] == part.name])
        out.append({"name": part.name, "input": _input_info(part),
                    **{key: {split: c[key] for split, c in counts.items()} for key in ("documents", "tokens", "shards")}})
    return out


def _input_info(part: Part) -> dict:
    return {**part.source.info, "fingerprint": part.source.fingerprint}


def _counted(results: list[dict], counts: str, examples: str, kind: str) -> tuple[Counter, list[dict]]:
    """The pieces' counts summed, and the first few examples of each kind, in input order."""
    total, shown, first = Counter(), Counter(), []
    for r in results:
        total.update(r[counts])
        for e in r[examples]:
            shown[e[kind]] += 1
            if shown[e[kind]] <= EXAMPLES_PER_REASON:
                first.append(e)
    return total, first


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
        if _SHARD_NAME.match(name) and name not in listed:
            storage.remove(join(out, name))
    storage.remove(join(out, WORK), recursive=True)


def _skip_text(skipped: Counter | dict) -> str:
    return ", ".join(f"{n} {sources.SKIP_REASONS[r]}" for r, n in sorted(skipped.items()))


def _summary(result: TokenizeResult, log) -> None:
    m = result.manifest
    log(f"tokenize: {m['source']['kind']} source -> {result.output}")
    for split, t in m["totals"].items():
        log(f"  {split:5s} {t['tokens']:>14,} tokens {t['documents']:>11,} documents {t['shards']:>5} shards")
    for source in m.get("sources", []):
        log(f"  source {source['name']}: " + "; ".join(
            f"{split} {source['tokens'][split]:,} tokens {source['documents'][split]:,} documents"
            for split in shards.SPLITS))
    if m["skipped"]:
        log(f"  skipped {sum(m['skipped'].values()):,} of {m['input_documents']:,} documents: "
            f"{_skip_text(m['skipped'])}")
        for e in m["skipped_examples"]:
            log(f"    e.g. {_describe(e)}")
    else:
        log(f"  skipped 0 of {m['input_documents']:,} documents")
    for line in _curation_lines(m["curation"]):
        log(f"  {line}")
    log(f"  {format_duration(result.seconds)} ({result.seconds:.1f} s), "
        f"{human(result.tokens / max(result.seconds, 1e-9))} tokens/s; pieces: {result.pieces_done} "
        f"tokenized, {result.pieces_reused} kept from an earlier run; shards kept: {result.shards_reused}")


def _curation_lines(c: dict) -> list[str]:
    lines = []
    for name, key in (("exact duplicates", "exact_duplicates"), ("near duplicates", "near_duplicates")):
        if c[key]["enabled"]:
            lines.append(f"{name}: {c[key]['documents']:,} documents ({c[key]['tokens']:,} tokens) removed")
    q = c["quality"]
    if q["enabled"]:
        failed = ", ".join(f"{n} {quality.RULES[r]}" for r, n in q["failed"].items())
        lines.append(f"quality: {sum(q['failed'].values()):,} documents removed" + (f" ({failed})" if failed else ""))
        lines += [f"  e.g. {e['where']}: {quality.RULES[e['rule']]}" for e in q["examples"]]
    k = c["contamination"]
    if not k["checked"]:
        lines.append(f"contamination: not checked ({k['why']})")
    else:
        lines.append(f"contamination: {k['train_documents']:,} training documents ({k['train_tokens']:,} tokens) share "
                     f"a {k['ngram']}-gram with {k['items_touched_count']:,} of {k['items']:,} HellaSwag items "
                     f"({k['spec']}); {'dropped' if k['dropped'] else 'counted, kept (tokenization.decontaminate=count)'}")
    return lines


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

