"""Curation before tokenization: exact and near duplicates, quality rules, eval contamination, against
independent computations of what each should find (exact text equality, true Jaccard similarity of word
5-gram sets, the HellaSwag items' own text)."""

from __future__ import annotations

import io
import json
import random
import re

import numpy as np
import pytest
import tiktoken
import torch
from conftest import tree_bytes, write_jsonl

from eval import hellaswag, suite
from eval.contamination import SHARE, clean_metrics
from pipeline.core.config import QualityConfig, load_config
from pipeline.core.model.gpt2 import GPT, GPTConfig, save_hf
from tokenization import dedup, job, ngrams, quality, shards, tokenizer
from tokenization.contamination import SMOKE
from tokenization.sources import CorpusError
from tokenization.stage import curation_metrics

ENC = tiktoken.get_encoding("gpt2")


def config(inputs, out, *overrides):
    return load_config("smoke", ["tokenization.val_fraction=0.0", *overrides],
                       {"data.input": [str(i) for i in inputs], "tokenization.output": str(out)})


def train_documents(out) -> list[tuple[int, ...]]:
    docs = []
    for tokens in shards.read_split(str(out), "train"):
        t = tokens.tolist()
        bounds = [i for i, x in enumerate(t) if x == tokenizer.EOT] + [len(t)]
        docs += [tuple(t[a + 1:b]) for a, b in zip(bounds, bounds[1:])]
    return docs


def shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"[^\W_]+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a: str, b: str) -> float:
    x, y = shingles(a), shingles(b)
    return len(x & y) / len(x | y)


def near_dup_corpus(seed: int = 0):
    """Distinct documents of random words; for some, a copy with 1 to 57 words replaced by new ones, whose
    true Jaccard similarity to its original is measured; and variants in whitespace, case and punctuation
    only (exact duplicates, as normalized text)."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(50_000)]
    fresh = iter(f"new{i}" for i in range(10**7))

    def doc():
        return " ".join(rng.choice(vocab) for _ in range(200))

    def mutated(text: str, changes: int) -> str:
        words = text.split()
        for i in rng.sample(range(len(words)), changes):
            words[i] = next(fresh)
        return " ".join(words)

    texts, pairs = [], []  # pairs: (original index, copy index, jaccard)
    for changes in [1 + i % 5 for i in range(80)] + [18 + i % 40 for i in range(160)]:
        original = doc()
        copy = mutated(original, changes)
        texts.append(original)
        pairs.append((len(texts) - 1, len(texts), jaccard(original, copy)))
        texts.append(copy)
    exact = []
    for i in range(0, 60, 3):  # whitespace variants of earlier documents, later in the input
        texts.append("  " + texts[i].replace(" ", "\n  ", 5) + "\n")
        exact.append((i, len(texts) - 1))
    for i in range(90, 120, 3):  # case and punctuation variants (of documents in the first file, like those above)
        texts.append(texts[i].upper().replace(" ", ", ", 7) + "!")
        exact.append((i, len(texts) - 1))
    texts += [doc() for _ in range(100)]
    return texts, pairs, exact


@pytest.mark.slow
def test_exact_and_near_duplicates_found_across_the_corpus_identically_on_one_or_two_workers(ray_local, tmp_path):
    texts, pairs, exact = near_dup_corpus()
    root = tmp_path / "corpus"
    root.mkdir()
    for part in range(3):  # the duplicates of a document often sit in another file, another piece
        write_jsonl(root / f"part-{part}.jsonl", [{"text": t} for t in texts[part::3]])
    write_jsonl(root / "part-3.jsonl", [b"{not json"] * 5000)  # pieces of which no document is kept
    order = [i for part in range(3) for i in range(part, len(texts), 3)]  # the input's global order
    position = {doc: k for k, doc in enumerate(order)}

    trees = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        result = job.run(config([root], out, "tokenization.near_dedup=true", f"tokenization.num_workers={workers}",
                                "tokenization.piece_bytes=40000"), log=lambda *_: None)
        trees[workers] = tree_bytes(out)
    assert trees[1] == trees[2]
    curation = result.manifest["curation"]

    kept = set(train_documents(tmp_path / "out1"))
    present = {i for i, t in enumerate(texts) if tuple(ENC.encode_ordinary(t)) in kept}
    # exact: every later whitespace variant gone, its first copy (in input order) kept
    for a, b in exact:
        first, later = sorted((a, b), key=position.get)
        assert later not in present and first in present
    assert curation["exact_duplicates"]["documents"] == len(exact)
    # near: one of each similar pair removed (recall), dissimilar pairs left alone; the first one kept
    high = [(a, b) for a, b, j in pairs if j >= 0.8]
    low = [(a, b) for a, b, j in pairs if j < 0.5]
    assert len(high) >= 60 and len(low) >= 100
    merged = lambda a, b: not (a in present and b in present)  # noqa: E731
    recall = sum(merged(a, b) for a, b in high) / len(high)
    false_merges = sum(merged(a, b) for a, b in low) / len(low)
    assert recall >= 0.9 and false_merges <= 0.01, (recall, false_merges)
    for a, b in high:
        if merged(a, b):
            assert min((a, b), key=position.get) in present
    assert curation["near_duplicates"]["documents"] == len(texts) - len(exact) - len(present)
    assert result.manifest["totals"]["train"]["documents"] == len(present)
    assert result.manifest["skipped"] == {"malformed_json": 5000}


def reference_ngrams(hashes: list[int], n: int) -> list[int]:
    """The polynomial hash of each run of n words, as plain Python integers modulo 2^64."""
    base = 0x100000001B3
    return [sum(h * base ** (n - 1 - k) for k, h in enumerate(hashes[i:i + n])) % 2**64
            for i in range(len(hashes) - n + 1)]


def test_a_batchs_words_and_ngrams_are_each_documents_own():
    rng = random.Random(2)
    pool = ["Hello,", "WORLD!", "naïve", "café—x", "日本語", "«a»", "3.14", "...", "\u2028", "", " ", "w1", "w2"]
    texts = ["", "!!!", "one", "a b c d"] + [" ".join(rng.choice(pool) for _ in range(rng.randrange(40)))
                                              for _ in range(60)]
    words = ngrams.Words.of(texts)
    assert len(words) == len(texts)
    for n, whole in ((2, False), (5, False), (5, True), (13, False)):
        grams, first = words.ngrams(n, whole_if_shorter=whole)
        doc = words.doc_of(first)
        for d, text in enumerate(texts):
            alone = ngrams.Words.of([text])
            assert words.document(d)[0].tolist() == alone.hashes.tolist() and len(alone) == 1
            assert words.document(d)[0].tolist() == ngrams.Words.of(["x", text, "y"]).document(1)[0].tolist()
            hashes = alone.hashes.tolist()
            size = min(n, len(hashes)) if whole else n
            assert grams[doc == d].tolist() == (reference_ngrams(hashes, size) if size else []), (d, n, whole)
    kept = np.array([d % 3 != 1 for d in range(len(texts))])
    selected = words.select(kept)
    assert [selected.document(k)[0].tolist() for k in range(len(selected))] == [
        words.document(d)[0].tolist() for d in np.flatnonzero(kept)]
    # the normalized words: case, punctuation and spacing do not count
    assert ngrams.Words.of(["Hello,  World!"]).hashes.tolist() == ngrams.Words.of(["hello world"]).hashes.tolist()


def test_minhash_signatures_of_a_batch_equal_datasketchs_per_document():
    from datasketch import MinHash

    rng = random.Random(1)
    signer = dedup.Signer(5, 14, 8)
    sizes = [0, 1, 3, 4, 5, 6, 40] + [rng.randrange(1, 3000) for _ in range(60)] + [9000]  # 9000: several blocks
    texts = [" ".join(f"w{rng.randrange(words * 2)}" for _ in range(words)) for words in sizes]  # shingles repeat
    words = ngrams.Words.of(texts)
    signatures = signer.signatures(words)
    for d, count in enumerate(sizes):
        hashes = words.document(d)[0].tolist()
        reference = MinHash(num_perm=112, seed=1, hashfunc=int, scheme="affine32")
        reference.update_batch([g % 2**32 for g in reference_ngrams(hashes, min(5, count))] if count else [])
        assert signatures[d].tolist() == reference.hashvalues.tolist(), count
    keys = signer.band_keys(words, dedup.exact_keys(words, [t.encode() for t in texts]))
    assert keys.shape == (len(texts), 14) and len(np.unique(keys)) == keys.size  # no two bands alike here


def test_band_keys_are_equal_exactly_when_a_bands_rows_are():
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 2**32, (2000, 14, 8), dtype=np.uint64)
    rows[1000:, 3] = rows[:1000, 3]  # band 3 shared
    rows[1000:, 5] = rows[:1000, 5]
    rows[1000:, 5, rng.integers(0, 8, 1000)] ^= np.uint64(1)  # band 5: one row one bit apart
    keys = dedup.band_hash(rows)
    assert (keys[1000:, 3] == keys[:1000, 3]).all() and not (keys[1000:, 5] == keys[:1000, 5]).any()
    assert len(np.unique(keys)) == keys.size - 1000


def test_exact_keys_tell_documents_apart_by_their_normalized_words_only():
    texts = ["The cat, sat.", "  the CAT sat ", "the cat sat on", "", " \n", "!!", "!! ", "?"]
    keys = dedup.exact_keys(ngrams.Words.of(texts), [t.encode() for t in texts])
    same = lambda a, b: (keys[a] == keys[b]).all()  # noqa: E731
    assert same(0, 1) and not same(0, 2)
    assert same(3, 4) and same(5, 6) and not same(5, 7) and not same(3, 5)  # no words: the text, spacing collapsed


def test_near_duplicate_clusters_on_ray_are_the_connected_components_of_shared_band_keys(ray_local, tmp_path):
    import networkx

    rng = np.random.default_rng(0)
    n, bands = 4000, 5
    keys = rng.integers(0, 2**64, (n, bands), dtype=np.uint64)
    keys[:, 0] = rng.integers(0, 40_000, n)  # buckets of one to a few documents; chains across bands
    for band in range(1, bands):
        a, b = rng.integers(0, n, (2, 200))
        keys[b, band] = keys[a, band]
    candidates = rng.random(n) > 0.2
    cuts = [0, 0, 1, 700, 2500, n]  # pieces of every size, an empty one among them
    urls = []
    for k, (start, end) in enumerate(zip(cuts, cuts[1:])):
        buffer = io.BytesIO()
        np.savez(buffer, doc_bands=keys[start:end])
        (tmp_path / f"p{k}.npz").write_bytes(buffer.getvalue())
        urls.append(str(tmp_path / f"p{k}.npz"))

    graph = networkx.Graph()  # every pair of candidates that share a key in some band, linked
    graph.add_nodes_from(np.flatnonzero(candidates).tolist())
    for band in range(bands):
        members = {}
        for doc in np.flatnonzero(candidates):
            members.setdefault(keys[doc, band], []).append(int(doc))
        for docs in members.values():
            graph.add_edges_from((docs[0], other) for other in docs[1:])
    expected = np.zeros(n, dtype=bool)
    for component in networkx.connected_components(graph):
        expected[sorted(component)[1:]] = True  # all but the earliest
    assert 200 < expected.sum() < candidates.sum() / 2
    assert np.array_equal(dedup.near_duplicates(urls, candidates, bands), expected)


def failed_rule(text: str, q: QualityConfig) -> str | None:
    return quality.failed_rules([text], q, ngrams.Words.of([text]))[0]


def test_quality_rules_each_fail_what_they_describe():
    q = QualityConfig(enabled=True)
    good = ("The cat sat on the mat and looked out at the garden, where the rain had stopped an hour before. "
            "It was a quiet day, and the house was warm.\nLater that evening the family came home with bread, "
            "cheese and apples from the market. They talked about the long walk back through the village, the "
            "old bridge that needed repairs, and the neighbour who had promised to help with the roof next week.")
    assert failed_rule(good, q) is None
    cases = {
        "too_few_words": "the cat and the dog",
        "mean_word_length": "a b c d e f the and to of " * 10,
        "symbol_ratio": good + " #tag" * 20,
        "bullet_lines": "\n".join(f"- remember that number {i} belongs with the other things" for i in range(60)),
        "ellipsis_lines": good + "\n" + "\n".join(f"and then the story ends {i}..." for i in range(3)),
        "alpha_words": good + " 1234" * 40,
        "stop_words": " ".join(f"apple{i} banana{i} cherry{i}" for i in range(30)),
        "duplicate_lines": "\n".join([good] + ["click here to see the offer and read the terms"] * 3),
        "top_2gram": good + " buy now" * 40,
        "duplicate_5grams": good + " " + good,
        "c4_lorem_ipsum": good + " Lorem ipsum dolor sit amet.",
        "c4_curly_bracket": good + " function() { return the value; }",
    }
    for rule, text in cases.items():
        assert failed_rule(text, q) == rule, rule
    assert failed_rule(" ".join(["word"] * 101), QualityConfig(enabled=True, max_words=100)) == "too_many_words"
    assert failed_rule(cases["c4_lorem_ipsum"], QualityConfig(enabled=True, c4_rules=False)) is None


_LETTERLESS_WORD = re.compile(r"(?<!\S)[^\sA-Za-z\u00c0-\u1fff\u2070-\U0010ffff]+(?!\S)")


def reference_rule(text: str, q: QualityConfig) -> str | None:
    """The rules as plain Python states them (str.split, a regular expression, sets and counts over the
    normalized words), in quality.RULES' order."""
    normalized = ngrams.Words.of([text])
    hashes, lengths = normalized.hashes, normalized.lengths
    h, words = hashes.tolist(), text.split()
    n = len(words)
    lines = [line for line in (raw.strip() for raw in text.splitlines()) if line]
    share = lambda test: sum(map(test, lines)) / len(lines) if lines else 0.0  # noqa: E731
    chars = sum(lengths.tolist())
    two = reference_ngrams(h, 2)
    top = max(two, key=lambda g: (two.count(g), -g)) if two else None
    top_chars = two.count(top) * sum(lengths[two.index(top):two.index(top) + 2].tolist()) if two and two.count(top) > 1 else 0
    five, seen, covered = reference_ngrams(h, 5), set(), set()
    for i, g in enumerate(five):
        if g in seen:
            covered.update(range(i, i + 5))
        seen.add(g)
    stop_hashes = set(ngrams.Words.of([" ".join(quality.STOP_WORDS)]).hashes.tolist())
    checks = {
        "too_few_words": n < q.min_words,
        "too_many_words": n > q.max_words,
        "mean_word_length": not q.min_mean_word_length <= sum(map(len, words)) / n <= q.max_mean_word_length,
        "symbol_ratio": (text.count("#") + text.count("...") + text.count("…")) / n > q.max_symbol_word_ratio,
        "bullet_lines": share(lambda line: line.startswith(("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·")))
        > q.max_bullet_lines,
        "ellipsis_lines": share(lambda line: line.endswith(("...", "…"))) > q.max_ellipsis_lines,
        "alpha_words": (n - len(_LETTERLESS_WORD.findall(text))) / n < q.min_alpha_words,
        "stop_words": len(stop_hashes & set(h)) < q.min_stop_words,
        "duplicate_lines": bool(lines) and (len(lines) - len(set(lines))) / len(lines) > q.max_duplicate_lines,
        "top_2gram": bool(chars) and top_chars / chars > q.max_top_2gram,
        "duplicate_5grams": bool(chars) and sum(lengths[sorted(covered)].tolist()) / chars > q.max_duplicate_5grams,
        "c4_lorem_ipsum": q.c4_rules and "lorem ipsum" in text.lower(),
        "c4_curly_bracket": q.c4_rules and ("{" in text or "}" in text),
    }
    return next((rule for rule in quality.RULES if checks[rule]), None)


def test_each_quality_rule_decides_as_its_plain_python_statement_on_random_documents():
    assert not any(chr(c).isspace() for c in range(0x3001, 0x110000))  # the classes' table stops at U+3000
    rng = random.Random(3)
    pool = (["the", "of", "and", "to", "with", "have", "be", "that", "cat", "sat", "garden", "x", "ab",
             "extraordinarily", "Café", "naïve", "日本語", "Ωμέγα", "1234", "3.14", "#", "#tag", "...", "…",
             "wait...", "....", "a......b", "!!", "—", "«»", "×", "¿", "(a)", "{", "}", "lorem", "ipsum", "Lorem ipsum", "e-mail", "\ud800"]
            + [f"w{i}" for i in range(30)])
    spaces = [" "] * 8 + ["  ", "\t", "\u00a0", "\u3000", "\x1c", "\u2003"]
    permissive = dict(enabled=True, min_words=0, max_words=10**9, min_mean_word_length=0.0, max_mean_word_length=1e9,
                      max_symbol_word_ratio=1.0, max_bullet_lines=1.0, max_ellipsis_lines=1.0, min_alpha_words=0.0,
                      min_stop_words=0, max_duplicate_lines=1.0, max_top_2gram=1.0, max_duplicate_5grams=1.0,
                      c4_rules=False)
    thresholds = {  # one rule at a time, at a threshold drawn where documents fall on both sides
        "too_few_words": lambda: {"min_words": rng.randrange(60)},
        "too_many_words": lambda: {"max_words": rng.randrange(120)},
        "mean_word_length": lambda: {"min_mean_word_length": rng.uniform(2, 5), "max_mean_word_length": rng.uniform(3, 7)},
        "symbol_ratio": lambda: {"max_symbol_word_ratio": rng.uniform(0, 0.2)},
        "bullet_lines": lambda: {"max_bullet_lines": rng.uniform(0, 0.6)},
        "ellipsis_lines": lambda: {"max_ellipsis_lines": rng.uniform(0, 0.6)},
        "alpha_words": lambda: {"min_alpha_words": rng.uniform(0.6, 1)},
        "stop_words": lambda: {"min_stop_words": rng.randrange(9)},
        "duplicate_lines": lambda: {"max_duplicate_lines": rng.uniform(0, 0.5)},
        "top_2gram": lambda: {"max_top_2gram": rng.uniform(0, 0.3)},
        "duplicate_5grams": lambda: {"max_duplicate_5grams": rng.uniform(0, 0.5)},
        "c4": lambda: {"c4_rules": True},
    }
    fired = {rule: 0 for rule in quality.RULES}
    def document() -> str:
        lines = []
        for _ in range(rng.randrange(1, 12)):
            if lines and rng.random() < 0.15:
                lines.append(rng.choice(["", "  ", "\t"]) + rng.choice(lines) + rng.choice(["", " "]))  # a repeated line
                continue
            words = [rng.choice(pool) for _ in range(rng.randrange(26))]
            if rng.random() < 0.3 and len(words) > 6:
                words += words[:rng.randrange(2, 7)] * rng.randrange(1, 4)  # a repeated phrase
            line = "".join(w + rng.choice(spaces) for w in words).rstrip(" ")
            lines.append(rng.choice(["", "- ", "• ", "* ", "–"]) * (rng.random() < 0.2) + line
                         + rng.choice(["...", "…", "....", " ..."]) * (rng.random() < 0.2))
        breaks = ["\n", "\n", "\r\n", "\n\n", "\n \t\n", "\r", "\v", "\f", "\x1d", "\x85", "\u2028", "\u2029"]
        return "start " + "".join(line + rng.choice(breaks) for line in lines)

    for _ in range(10):  # batches of 25 documents, each decided in one call, as a tokenizer actor does
        texts = [document() for _ in range(25)]
        words = ngrams.Words.of(texts)
        for q in [QualityConfig(enabled=True)] + [QualityConfig(**{**permissive, **draw()}) for draw in thresholds.values()]:
            for text, rule in zip(texts, quality.failed_rules(texts, q, words)):
                assert rule == reference_rule(text, q), (text, q)
                if rule:
                    fired[rule] += 1
    assert min(fired.values()) >= 10, fired  # every rule decided documents both ways


def smoke_items() -> list[dict]:
    return [json.loads(line) for line in SMOKE.read_text().splitlines() if line.strip()]


def test_the_items_a_batch_of_documents_overlaps_are_found_in_a_large_eval_set(tmp_path):
    from tokenization.contamination import EvalIndex

    rng = random.Random(4)
    vocab = [f"v{i}" for i in range(5000)]
    phrase = lambda k: " ".join(rng.choice(vocab) for _ in range(k))  # noqa: E731
    # 20,000 items, 4 texts each: the bitmap in front of the sorted keys is sized as for the official set
    items = [{"ctx": phrase(rng.randrange(8, 30)), "endings": [phrase(rng.randrange(1, 12)) for _ in range(4)]}
             for _ in range(20_000)]
    items[7]["ctx"], items[7]["endings"][0] = "a b c", "d e"  # a text of 5 words: matched whole
    index = EvalIndex(str(write_jsonl(tmp_path / "items.jsonl", items)), 13)
    assert index.items == len(items) and 5 in index.lengths and len(index.keys) > 500_000

    def grams(text: str, n: int) -> set:
        words = re.findall(r"[^\W_]+", text.lower())
        return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}

    docs = [phrase(300) for _ in range(200)]
    for d in range(0, 200, 7):  # quote a random item's context and one ending, in the middle of the text
        item = items[rng.randrange(len(items))]
        docs[d] = f"{docs[d][:500]} {item['ctx']} {rng.choice(item['endings'])}. {docs[d][500:]}"
    docs[3] += " A, b c. D e!"
    owners = {}  # each item text's n-grams (all of it when shorter than 13 words) -> items
    for item, it in enumerate(items):
        for ending in it["endings"]:
            text = f"{it['ctx']} {ending}"
            for gram in grams(text, min(13, len(text.split()))):
                owners.setdefault(gram, set()).add(item)
    expected = {}
    for d, doc in enumerate(docs):
        found = {item for size in range(1, 14) for gram in grams(doc, size) for item in owners.get(gram, ())}
        if found:
            expected[d] = sorted(found)
    assert len(expected) >= 25 and expected[3] == [7]
    assert index.touched(ngrams.Words.of(docs)) == expected


@pytest.mark.slow
def test_contamination_is_counted_or_dropped_and_quality_failures_counted_with_their_lines(ray_local, prose_texts,
                                                                                          tmp_path):
    items = smoke_items()
    prose = prose_texts[:40]
    texts = list(prose)
    planted = {5: 3, 17: 7, 30: 3}  # document -> the smoke item whose context and an ending it quotes
    for doc, item in planted.items():
        texts[doc] = f"{texts[doc]}\n\nAs we read once: {items[item]['ctx']} {items[item]['endings'][1]} And so on."
    texts.append(items[0]["ctx"])  # the context alone, under 13 words: no shared 13-gram
    texts.append("too short to keep")  # fails quality.min_words
    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])

    counted = job.run(config([corpus], tmp_path / "count", "tokenization.quality.enabled=true",
                             "tokenization.quality.min_words=5", "tokenization.quality.c4_rules=false",
                             "tokenization.quality.max_duplicate_5grams=1.0", "tokenization.quality.max_top_2gram=1.0",
                             "tokenization.quality.max_duplicate_lines=1.0", "tokenization.quality.min_alpha_words=0.0",
                             "tokenization.quality.min_stop_words=0"), log=lambda *_: None).manifest
    c = counted["curation"]["contamination"]
    assert c["checked"] and c["sha256"] and c["items"] == len(items)
    assert (c["train_documents"], c["items_touched"], c["dropped"]) == (3, [3, 7], False)
    assert c["train_tokens"] == sum(len(ENC.encode_ordinary(texts[d])) + 1 for d in planted)
    assert curation_metrics(counted["curation"]) == {  # what the tokenize stage logs to MLflow
        "tokenize/exact_duplicates": 0, "tokenize/quality_too_few_words": 1,
        "tokenize/contaminated_documents": 3, "tokenize/contaminated_items": 2}
    q = counted["curation"]["quality"]
    assert q["failed"] == {"too_few_words": 1}
    assert q["examples"] == [{"where": f"{corpus}:{len(texts)}", "rule": "too_few_words"}]
    assert counted["input_documents"] == len(texts)
    kept = set(train_documents(tmp_path / "count"))
    assert all(tuple(ENC.encode_ordinary(texts[d])) in kept for d in planted)

    # the eval stage's clean subset: the items no training document touches, scored as hellaswag.metrics does
    items, info = hellaswag.load("smoke")
    rng = np.random.default_rng(0)
    scores = {p: {"loglikelihoods": rng.normal(size=(len(items), 4)), "tokens": rng.integers(1, 9, (len(items), 4))}
              for p in hellaswag.PROTOCOLS}
    metrics, record = clean_metrics(config([corpus], tmp_path / "count"), items, scores, info)
    clean = [i for i in range(len(items)) if i not in (3, 7)]
    labels = np.array([it.label for it in items])[clean]
    assert metrics[SHARE] == 2 / len(items) and record["items_contaminated"] == [3, 7]
    assert record["items_clean"] == len(clean)
    assert metrics["hellaswag_clean/harness/acc"] == (scores["harness"]["loglikelihoods"][clean].argmax(1) == labels).mean()
    assert metrics["hellaswag_clean/completion/acc"] == (scores["completion"]["loglikelihoods"][clean].argmax(1)
                                                         == labels).mean()
    other = clean_metrics(config([corpus], tmp_path / "count"), items, scores, {**info, "sha256": "0" * 64})
    assert other[0] == {} and not other[1]["checked"]  # checked against other items: no clean score claimed
    # and the eval stage reports both, on a (tiny, random) model
    torch.manual_seed(0)
    save_hf(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=128)), tmp_path / "model")
    printed = []
    cfg = load_config("smoke", ["eval.max_new_tokens=0"], {"tokenization.output": str(tmp_path / "count")})
    results = suite.run(cfg, str(tmp_path / "model"), data=False, device="cpu", log=printed.append)
    assert results["metrics"][SHARE] == 2 / len(items) and results["hellaswag"]["contamination"]["items_clean"] == len(clean)
    assert results["hellaswag"]["contamination"]["items_contaminated"] == [3, 7]
    assert any("smoke items acc_norm [clean]" in line and "12.5% contaminated" in line for line in printed)

    job.run(config([corpus], tmp_path / "drop", "tokenization.decontaminate=drop"), log=lambda *_: None)
    kept = set(train_documents(tmp_path / "drop"))
    assert not any(tuple(ENC.encode_ordinary(texts[d])) in kept for d in planted)
    assert len(kept) == len(texts) - len(planted)

    off = job.run(config([corpus], tmp_path / "off", "tokenization.decontaminate=off"), log=lambda *_: None).manifest
    assert off["curation"]["contamination"] == {"checked": False, "mode": "off", "why": "tokenization.decontaminate=off"}


@pytest.mark.slow
def test_changed_curation_settings_are_named_and_a_resumed_run_redoes_only_what_they_change(ray_local, prose_corpus,
                                                                                         tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = [prose_corpus], out, "tokenization.piece_bytes=262144"
    first = job.run(config(*args), log=lambda *_: None)
    with pytest.raises(CorpusError, match=r"changed: tokenization.dedup \(True -> False\)"):
        job.run(config(*args, "tokenization.dedup=false"), log=lambda *_: None)

    # a run that stops once its pieces are tokenized (as a crash would), resumed with other settings
    def crash(*_):
        raise RuntimeError("stopped")

    said = []
    with monkeypatch.context() as m:
        m.setattr(job, "_write_shards", crash)
        with pytest.raises(RuntimeError):
            job.run(config(*args, "tokenization.dedup=false"), overwrite=True, log=said.append)
    assert any("redone for changed settings: tokenization.dedup (True -> False)" in line for line in said)
    # exact dedup and decontaminate=drop are decided over the whole corpus, after the pieces: all kept
    again = job.run(config(*args, "tokenization.decontaminate=drop"), overwrite=True, log=lambda *_: None)
    assert (again.pieces_done, again.pieces_reused) == (0, first.pieces_done)
    with monkeypatch.context() as m:
        m.setattr(job, "_write_shards", crash)
        with pytest.raises(RuntimeError):
            job.run(config(*args, "tokenization.dedup=false"), overwrite=True, log=lambda *_: None)
    # quality rules change what each piece holds: every piece is redone
    redone = job.run(config(*args, "tokenization.quality.enabled=true"), overwrite=True, log=lambda *_: None)
    assert (redone.pieces_done, redone.pieces_reused) == (first.pieces_done, 0)
    m = redone.manifest  # every input document is in a split or counted as removed
    assert m["input_documents"] == (sum(t["documents"] for t in m["totals"].values())
                                    + sum(m["curation"]["quality"]["failed"].values())
                                    + m["curation"]["exact_duplicates"]["documents"])


def test_an_eval_set_that_cannot_be_read_is_recorded_as_unchecked_with_count_and_stops_drop(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no copy cached by the eval stage
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    said = []
    index, why = job._eval_index(load_config("smoke", ["eval.hellaswag=official"]), said.append)
    assert index is None and "cannot read the HellaSwag items (official)" in why and len(said) == 1
    with pytest.raises(CorpusError, match=r"^tokenization.decontaminate=drop: cannot read the HellaSwag items"):
        job._eval_index(load_config("smoke", ["eval.hellaswag=official", "tokenization.decontaminate=drop"]), print)
    with pytest.raises(CorpusError, match="not a HellaSwag item"):  # a file that is not HellaSwag: named, always
        job._eval_index(load_config("smoke", [f"eval.hellaswag={write_jsonl(tmp_path / 'x.jsonl', [{'a': 1}])}"]), print)


@pytest.mark.slow
def test_register_keeps_best_off_a_contaminated_model_unless_allowed(tmp_path):
    from mlflow import MlflowClient

    from eval.hellaswag import ACC_NORM
    from pipeline import register
    from pipeline.core import registry
    from pipeline.core.lineage import Lineage

    checkpoint = tmp_path / "final"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")  # registering copies them; it never loads them
    (checkpoint / "config.json").write_text("{}")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    lineage = Lineage(uri, "curation", str(tmp_path))
    lineage.start_parent("p", {}, {})
    client = MlflowClient(tracking_uri=uri)

    def register_model(score: float, share: float, *overrides: str) -> str:
        cfg = load_config("smoke", list(overrides), {"run.root": str(tmp_path)})
        refusal = register.contamination_refusal(cfg, share)  # what the register stage asks before registering
        assert (refusal is None) == (share <= cfg.tracking.max_contaminated or cfg.tracking.allow_contaminated)
        if refusal:
            assert f"{share:.1%}" in refusal and "tracking.max_contaminated" in refusal
        registry.register(lineage, lineage.stage_run(f"register-{score}"), str(checkpoint), "gpt2-pipeline", "best",
                          score, {}, model_code=register._SERVED, score_key=ACC_NORM, eligible=refusal is None)
        return int(client.get_model_version_by_alias("gpt2-pipeline", "best").version)

    assert register_model(0.30, 0.0) == 1
    assert register_model(0.40, 2 / 16) == 1  # better, but 12.5% contaminated > tracking.max_contaminated
    assert register_model(0.40, 2 / 16, "tracking.max_contaminated=0.2") == 3
    assert register_model(0.50, 1.0, "tracking.allow_contaminated=true") == 4
    assert len(client.search_model_versions("name='gpt2-pipeline'")) == 4
