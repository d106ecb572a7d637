"""The tokenization stage against tiktoken and the llm.c shard spec: counts, determinism, resume, bad input."""

from __future__ import annotations

import gzip
import hashlib
import json
import struct
import subprocess
import sys
import time
from array import array
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken
from conftest import REPO, kill_tree, run_cli, tree_bytes, write_jsonl

from pipeline.core.config import Config, load_config
from tokenization import job, shards, tokenizer
from tokenization.sources import SKIP_REASONS, CorpusError
from tokenization.stage import STAGE, source_metrics

ENC = tiktoken.get_encoding("gpt2")


def config(inputs, out, *overrides, **values):
    values = {"data.input": [str(i) for i in inputs], "tokenization.output": str(out),
              **{k.replace("__", "."): v for k, v in values.items()}}
    return load_config("smoke", list(overrides), values)


def documents_in(out: Path, split: str, source: str | None = None) -> list[tuple[int, ...]]:
    """Every document of a split (of one source), in order, read back from the shards (split at <|endoftext|>)."""
    docs = []
    for tokens in shards.read_split(str(out), split, source=source):
        t = tokens.tolist()
        assert t[0] == tokenizer.EOT, "every shard starts with a document separator"
        bounds = [i for i, x in enumerate(t) if x == tokenizer.EOT] + [len(t)]
        docs += [tuple(t[a + 1:b]) for a, b in zip(bounds, bounds[1:])]
    return docs


def is_val(text: str, fraction: float) -> bool:
    """The split rule as the manifest documents it, computed independently."""
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return h < int(fraction * 2**64)


def test_tokens_equal_tiktoken_and_split_follows_the_documented_rule(ray_local, prose_corpus, prose_texts, tmp_path):
    out = tmp_path / "out"
    result = job.run(config([prose_corpus], out, "tokenization.piece_bytes=65536"))
    m = result.manifest

    # exact duplicates (equal once whitespace is collapsed) are kept once: the first in input order
    seen, texts = set(), []
    for t in prose_texts:
        if " ".join(t.split()) not in seen:
            seen.add(" ".join(t.split()))
            texts.append(t)
    assert m["curation"]["exact_duplicates"]["documents"] == len(prose_texts) - len(texts) > 0
    expected = [tuple(ENC.encode_ordinary(t)) for t in texts]
    assert m["totals"]["train"]["tokens"] + m["totals"]["val"]["tokens"] == sum(len(e) + 1 for e in expected)
    assert m["input_documents"] == len(prose_texts) and m["skipped"] == {}
    # data.input alone: the manifest has no trace of data.sources
    assert "sources" not in m and "sources" not in m["config"]["data"] and shards.source_names(m) == []
    assert all("source" not in s for s in m["shards"]) and {s["file"][:6] for s in m["shards"]} == {"train_", "val_00"}
    # the documents themselves, in input order, each split by its hash as documented
    val = [is_val(t, 0.05) for t in texts]
    assert documents_in(out, "train") == [e for e, v in zip(expected, val) if not v]
    assert documents_in(out, "val") == [e for e, v in zip(expected, val) if v]
    assert 0 < sum(val) < len(val)
    # shards respect the target size (documents whole) and the manifest's counts
    for info in shards.shards(m):
        tokens = shards.read_tokens(str(out / info.file), info.tokens)
        assert info.tokens <= 200_000 and int((tokens == tokenizer.EOT).sum()) == info.documents
    assert m["tokenizer"]["files_sha256"] == {
        "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
        "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"}


def test_an_independent_llmc_reader_reads_a_shard(ray_local, prose_corpus, prose_texts, tmp_path):
    out = tmp_path / "out"
    job.run(config([prose_corpus], out, "tokenization.val_fraction=0.0"))
    # llm.c's spec: 256 int32 header (magic 20240520, version 1, count), then count uint16 tokens
    with open(out / "train_000000.bin", "rb") as f:
        magic, version, count = struct.unpack("<256i", f.read(1024))[:3]
        tokens = array("H")
        tokens.frombytes(f.read())
    assert (magic, version, count) == (20240520, 1, len(tokens))
    first = ENC.encode_ordinary(prose_texts[0])
    assert list(tokens[:len(first) + 2]) == [50256, *first, 50256]


@pytest.mark.slow
def test_output_is_byte_identical_with_one_or_two_workers_and_any_piece_size(ray_local, prose_corpus, tmp_path):
    runs = {"1 worker": ("tokenization.num_workers=1", "tokenization.piece_bytes=65536"),
            "2 workers": ("tokenization.num_workers=2", "tokenization.piece_bytes=65536"),
            "2 workers, big pieces": ("tokenization.num_workers=2", "tokenization.piece_bytes=4194304")}
    trees = {}
    for name, overrides in runs.items():
        out = tmp_path / name.replace(" ", "_").replace(",", "")
        job.run(config([prose_corpus], out, *overrides))
        trees[name] = tree_bytes(out)
    assert trees["1 worker"] == trees["2 workers"] == trees["2 workers, big pieces"]
    assert "manifest.json" in trees["1 worker"] and len(trees["1 worker"]) >= 5


@pytest.mark.slow
def test_val_split_does_not_depend_on_file_order(ray_local, prose_texts, tmp_path):
    forward, backward = tmp_path / "fwd", tmp_path / "bwd"
    forward.mkdir(), backward.mkdir()
    write_jsonl(forward / "a.jsonl", [{"text": t} for t in prose_texts])
    write_jsonl(backward / "a.jsonl", [{"text": t} for t in reversed(prose_texts[::2])])
    write_jsonl(backward / "b.jsonl", [{"text": t} for t in reversed(prose_texts[1::2])])
    a = job.run(config([forward], tmp_path / "o1", "tokenization.val_tokens=30000"))
    b = job.run(config([backward], tmp_path / "o2", "tokenization.val_tokens=30000"))
    assert Counter(documents_in(tmp_path / "o1", "val")) == Counter(documents_in(tmp_path / "o2", "val"))
    assert a.manifest["totals"] == b.manifest["totals"]
    # the budget takes the smallest hashes: one more hash group would not have fitted
    hashes = sorted((int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little"),
                     len(ENC.encode_ordinary(t)) + 1) for t in prose_texts)
    val_tokens = a.manifest["totals"]["val"]["tokens"]
    taken = sum(1 for _ in documents_in(tmp_path / "o1", "val"))
    assert val_tokens == sum(n for _, n in hashes[:taken]) <= 30000 < val_tokens + hashes[taken][1]


def mixture(web, books, out, *overrides, weights=(4, 1), max_epochs=None):
    sources = [{"name": "web", "input": [str(web)], "weight": weights[0]},
               {"name": "books", "input": str(books), "weight": weights[1], "max_epochs": max_epochs,
                "text_field": "body"}]
    return load_config("smoke", ["tokenization.piece_bytes=65536", *overrides],
                       {"data.sources": sources, "tokenization.output": str(out)})


def test_a_mixture_of_sources_is_one_job_with_per_source_shards_and_dedup_across_sources(ray_local, prose_texts,
                                                                                         tmp_path):
    web_texts, books_texts = prose_texts[:250], [*prose_texts[-30:], prose_texts[7]]  # one document in both
    web = tmp_path / "web"
    web.mkdir()
    for part in range(2):
        write_jsonl(web / f"part-{part}.jsonl", [{"text": t} for t in web_texts[part::2]])
    books = write_jsonl(tmp_path / "books.jsonl", [{"body": t} for t in books_texts])  # its own text_field
    trees, lines = {}, []
    for workers in (1, 2):
        result = job.run(mixture(web, books, tmp_path / f"out{workers}", f"tokenization.num_workers={workers}"),
                         log=lines.append)
        trees[workers] = tree_bytes(tmp_path / f"out{workers}")
    assert trees[1] == trees[2]  # byte-identical on any number of workers
    out, m = tmp_path / "out1", result.manifest

    # exact duplicates are kept once across the whole corpus, the first in (source, input order): the
    # document both sources hold stays in web
    order = [("web", t) for part in range(2) for t in web_texts[part::2]] + [("books", t) for t in books_texts]
    seen, kept = set(), {"web": [], "books": []}
    for name, t in order:
        if " ".join(t.split()) not in seen:
            seen.add(" ".join(t.split()))
            kept[name].append(t)
    assert prose_texts[7] not in kept["books"] and len(kept["books"]) == 30
    assert m["curation"]["exact_duplicates"]["documents"] == len(order) - len(kept["web"]) - len(kept["books"])
    # each source's shards hold its kept documents, as tiktoken encodes them, split by the documented rule
    assert shards.source_names(m) == [s["name"] for s in m["sources"]] == ["web", "books"]
    for entry in m["sources"]:
        name = entry["name"]
        expected = {split: [tuple(ENC.encode_ordinary(t)) for t in kept[name] if is_val(t, 0.05) == (split == "val")]
                    for split in shards.SPLITS}
        for split, docs in expected.items():
            assert documents_in(out, split, name) == docs
            assert entry["documents"][split] == len(docs)
            assert entry["tokens"][split] == sum(len(d) + 1 for d in docs)
            assert entry["shards"][split] == len(shards.shards(m, split, name))
            assert source_metrics(m)[f"tokenize/{name}/tokens_{split}"] == entry["tokens"][split]
        assert entry["input"]["kind"] == "files" and entry["input"]["text_field"] == {"web": "text", "books": "body"}[name]
        assert f"  source {name}: train {entry['tokens']['train']:,} tokens" in "\n".join(lines)
    assert all(s["file"].startswith(f"{s['source']}-{s['split']}_") for s in m["shards"])
    assert len(shards.shards(m, "train", "web")) >= 2 and m["totals"] == {
        split: {key: sum(e[key][split] for e in m["sources"]) for key in ("tokens", "documents", "shards")}
        for split in shards.SPLITS}
    assert m["config"]["data"]["sources"][1] == {"name": "books", "input": [str(books)], "text_field": "body",
                                                 **{k: None for k in ("format", "text_unit", "hf_config", "hf_split",
                                                                      "hf_revision")}}
    assert job.verify(str(out), log=lines.append) and lines[-1] == f"verify: {len(m['shards'])}/{len(m['shards'])} shards intact in {out}"
    with pytest.raises(shards.ShardError, match="source 'news' is not in the dataset"):
        shards.local_split(str(out), "train", source="news")

    assert [(d["name"], d["profile"]["tokens"]) for d in shards.splits_as_datasets(str(out))] == [
        (f"{e['name']}/{split}", e["tokens"][split]) for e in m["sources"] for split in shards.SPLITS]

    # weights and epoch caps are training's: changing them leaves the dataset complete, nothing redone
    reweighted = mixture(web, books, out, weights=(1, 9), max_epochs=2)
    assert job.complete(reweighted) and job.run(reweighted, log=lambda *_: None).already_complete
    # the stage's MLflow record: each source's counts and settings, not its weight (training logs that)
    record = STAGE.run(reweighted, False, None, {})
    assert record.metrics["tokenize/books/documents_train"] == m["sources"][1]["documents"]["train"]
    assert record.params["data.sources.books.text_field"] == "body" and "data.sources.books.weight" not in record.params
    # a source that curation empties is refused, naming it: training could not draw from it
    write_jsonl(books, [{"body": t} for t in web_texts[:3]])
    with pytest.raises(CorpusError, match=r"data.sources.1 \('books'\): no training document is left"):
        job.run(mixture(web, books, tmp_path / "dup"), log=lambda *_: None)


def test_rerun_of_a_finished_job_does_nothing(ray_local, prose_corpus, tmp_path):
    out = tmp_path / "out"
    job.run(config([prose_corpus], out))
    before = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    again = job.run(config([prose_corpus], out))
    assert again.already_complete
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == before
    with pytest.raises(CorpusError, match="another input or config"):
        job.run(config([prose_corpus], out, "tokenization.val_fraction=0.2"))
    replaced = job.run(config([prose_corpus], out, "tokenization.val_fraction=0.2"), overwrite=True)
    assert not replaced.already_complete and replaced.manifest["split"]["val_fraction"] == 0.2
    assert job.verify(str(out))


@pytest.mark.slow
def test_killed_run_resumes_to_identical_output_and_a_second_rerun_does_nothing(ray_local, prose_texts, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):  # ~8 MB, 128 pieces: long enough to be killed part-way
        write_jsonl(corpus / f"c{i}.jsonl", [{"text": f"[{i}] {t}"} for t in prose_texts])
    args = ["tokenization/run.py", "--config", "smoke", "--input", str(corpus), "tokenization.piece_bytes=65536",
            "tokenization.num_workers=2"]
    reference = tmp_path / "reference"
    job.run(config([corpus], reference, "tokenization.piece_bytes=65536"))

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, *args, "--output", str(out)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pieces = out / "_work" / "pieces"
    deadline = time.time() + 240
    while len(list(pieces.glob("*.json"))) < 4:
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    kill_tree(proc.pid)  # the driver, its Ray cluster and the tokenizer actors, all gone before the count
    proc.wait()
    done_before = len(list(pieces.glob("*.json")))
    assert not (out / "manifest.json").exists() and done_before < 128

    resumed = run_cli(*args, "--output", str(out))
    kept = int(resumed.stdout.split(" tokenized, ")[1].split(" kept")[0])
    assert kept >= done_before - 2  # pieces whose files were still being written are redone
    assert tree_bytes(out) == tree_bytes(reference)

    again = run_cli(*args, "--output", str(out))
    assert "nothing to do" in again.stdout
    assert tree_bytes(out) == tree_bytes(reference)


BAD_LINES = {
    "malformed_json": b'{"text": "unterminated',
    "missing_text": b'{"body": "no text field here"}',
    "non_string_text": b'{"text": 42}',
    "invalid_utf8": b'{"text": "bad \xff byte"}',
    "empty": b'{"text": "   "}',
    "nul_bytes": b'{"text": "a\\u0000b"}',
    "too_large": json.dumps({"text": "word " * 400}).encode(),
}
GOOD = ["First good document.", "Second good document.", "Third good one, after the bad line."]


@pytest.fixture
def bad_corpus(tmp_path):
    """One file per kind of bad line, each the 3rd line between good documents."""
    root = tmp_path / "bad"
    root.mkdir()
    for reason, line in BAD_LINES.items():
        write_jsonl(root / f"{reason}.jsonl", [{"text": GOOD[0]}, {"text": GOOD[1]}, line, {"text": GOOD[2]}])
    return root


def test_bad_input_is_skipped_counted_and_located(ray_local, bad_corpus, tmp_path):
    result = job.run(config([bad_corpus], tmp_path / "out", "tokenization.max_doc_bytes=1000",
                            "tokenization.val_fraction=0.0", "tokenization.dedup=false"))  # GOOD is in every file
    m = result.manifest
    assert m["skipped"] == {reason: 1 for reason in BAD_LINES}
    assert {e["reason"]: e["where"] for e in m["skipped_examples"]} == {
        reason: f"{bad_corpus / reason}.jsonl:3" for reason in BAD_LINES}
    assert m["input_documents"] == 4 * len(BAD_LINES)
    assert m["totals"]["train"]["documents"] == 3 * len(BAD_LINES)
    assert m["totals"]["train"]["tokens"] == len(BAD_LINES) * sum(len(ENC.encode_ordinary(t)) + 1 for t in GOOD)


@pytest.mark.parametrize("reason", list(BAD_LINES))
def test_strict_mode_fails_on_the_first_bad_document_naming_file_and_line(ray_local, bad_corpus, tmp_path, reason):
    cfg = config([bad_corpus / f"{reason}.jsonl"], tmp_path / "out", "tokenization.max_doc_bytes=1000",
                 "tokenization.strict=true")
    with pytest.raises(CorpusError) as err:
        job.run(cfg)
    assert f"{bad_corpus / reason}.jsonl:3: {SKIP_REASONS[reason]}" in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_line_numbers_are_exact_in_later_pieces_of_a_file(ray_local, tmp_path):
    lines = [{"text": f"document number {i} " * 20} for i in range(600)]
    lines[456] = b'{"text": broken json}'
    path = write_jsonl(tmp_path / "big.jsonl", lines)
    cfg = config([path], tmp_path / "out", "tokenization.piece_bytes=8192", "tokenization.strict=true")
    with pytest.raises(CorpusError, match=f"{path}:457: malformed JSON"):
        job.run(cfg)
    result = job.run(config([path], tmp_path / "out2", "tokenization.piece_bytes=8192"))
    assert result.manifest["skipped_examples"][0]["where"] == f"{path}:457"
    assert result.manifest["totals"]["train"]["documents"] + result.manifest["totals"]["val"]["documents"] == 599


@pytest.mark.slow
def test_parquet_gzip_text_and_hub_layout_inputs(ray_local, tmp_path):
    texts = [f"Parquet document {i}: the quick brown fox." for i in range(50)]
    pq.write_table(pa.table({"text": texts + [None], "n": list(range(51))}), tmp_path / "p.parquet", row_group_size=10)
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "ints.parquet")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as f:
        f.writelines(json.dumps({"text": f"gzip document {i}"}) + "\n" for i in range(20))
    (tmp_path / "t.txt").write_text("A whole text file is one document.\nWith two lines.")
    (tmp_path / "notes.csv").write_text("ignored,because,unknown")
    result = job.run(config([tmp_path / "*"], tmp_path / "out", "tokenization.val_fraction=0.0"))
    m = result.manifest
    assert m["skipped"] == {"missing_text": 1, "non_string_text": 2}
    assert m["totals"]["train"]["documents"] == 50 + 20 + 1
    assert {e["where"] for e in m["skipped_examples"]} >= {f"{tmp_path / 'p.parquet'}: row 51",
                                                           f"{tmp_path / 'ints.parquet'}: row 1"}
    assert not any(f["path"].endswith(".csv") for f in m["source"]["files"])

    # text with one document per line or per paragraph
    (tmp_path / "lines").mkdir()
    (tmp_path / "lines" / "l.txt").write_text("one\ntwo\n\nthree\n")
    per_line = job.run(config([tmp_path / "lines"], tmp_path / "o2", "data.text_unit=line",
                              "tokenization.val_fraction=0.0"))
    assert per_line.manifest["totals"]["train"]["documents"] == 3 and per_line.manifest["skipped"] == {"empty": 1}
    per_paragraph = job.run(config([tmp_path / "lines"], tmp_path / "o3", "data.text_unit=paragraph",
                                   "tokenization.val_fraction=0.0"))
    assert per_paragraph.manifest["totals"]["train"]["documents"] == 2
    assert documents_in(tmp_path / "o3", "train") == [tuple(ENC.encode_ordinary("one\ntwo")),
                                                      tuple(ENC.encode_ordinary("three"))]

    # a Hugging Face dataset laid out as on the Hub (README configs), resolved by `datasets`
    hub = tmp_path / "hub"
    (hub / "sample" / "10BT").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts[:7]}), hub / "sample" / "10BT" / "000_00000.parquet")
    (hub / "README.md").write_text("---\nconfigs:\n- config_name: sample-10BT\n  data_files:\n"
                                   "  - split: train\n    path: sample/10BT/*\n---\n")
    hf = job.run(config([f"hf:{hub}"], tmp_path / "o4", "data.hf_config=sample-10BT", "tokenization.val_fraction=0.0"))
    assert hf.manifest["source"]["kind"] == "hf" and hf.manifest["source"]["config"] == "sample-10BT"
    assert hf.manifest["totals"]["train"]["documents"] == 7


def test_missing_or_empty_input_fails_before_any_ray_work(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec, message in ((tmp_path / "nope.jsonl", "does not exist"),
                          (tmp_path / "empty" / "*.jsonl", "matches no files"),
                          (tmp_path / "empty", "is empty")):
        proc = run_cli("tokenization/run.py", "--input", str(spec), "--output", str(tmp_path / "o"), check=False)
        assert proc.returncode == 2 and message in proc.stderr and str(spec) in proc.stderr
        assert "Ray" not in proc.stderr  # no cluster was started
    proc = run_cli("tokenization/run.py", "tokenization.shard_tokenz=5", check=False)
    assert proc.returncode == 2 and "unknown key 'tokenization.shard_tokenz'" in proc.stderr
    # a source's input: the error names the source and its key
    for books, message in (("[builtin, x.jsonl]", r"data.sources.1.input: 'builtin' cannot be combined with other "
                                                  r"inputs \(source 'books'\)"),
                           (str(tmp_path / "nope.jsonl"), r"input '.*nope.jsonl' does not exist \(source 'books'\)")):
        cfg = load_config("smoke", [f"data.sources=[{{name: web, input: builtin, weight: 1}}, "
                                    f"{{name: books, input: {books}, weight: 1}}]"])
        with pytest.raises(CorpusError, match=message):
            job.fingerprint(cfg)


@pytest.mark.slow
def test_a_command_that_names_no_preset_tokenizes_with_the_production_sizes(prose_corpus, tmp_path):
    proc = run_cli("tokenization/run.py", "--input", str(prose_corpus), "--output", str(tmp_path / "o"))
    assert proc.stdout.splitlines()[0] == "config: preset 'base' (production defaults; no --config given)"
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    production, smoke = Config().tokenization, load_config("smoke").tokenization
    used = manifest["config"]["tokenization"]
    assert used["shard_tokens"] == production.shard_tokens == load_config("gpt2-124m").tokenization.shard_tokens
    assert used["val_fraction"] == production.val_fraction != smoke.val_fraction
    assert [s["split"] for s in manifest["shards"]] == ["train", "val"]  # 610k tokens: one shard each
    assert "default: base" in run_cli("tokenization/run.py", "--help").stdout


def test_verify_names_a_shard_with_a_flipped_byte_or_a_truncation(ray_local, prose_corpus, tmp_path):
    out = tmp_path / "out"
    job.run(config([prose_corpus], out))
    assert run_cli("tokenization/run.py", "verify", str(out)).returncode == 0
    victim = out / "train_000001.bin"
    data = bytearray(victim.read_bytes())
    data[5000] ^= 0x01
    victim.write_bytes(bytes(data))
    proc = run_cli("tokenization/run.py", "verify", str(out), check=False)
    assert proc.returncode == 1 and "FAILED train_000001.bin: sha256" in proc.stdout
    (out / "val_000000.bin").write_bytes((out / "val_000000.bin").read_bytes()[:-2])
    failures = shards.verify(str(out))
    assert len(failures) == 2 and "val_000000.bin" in failures[1] and "truncated" in failures[1]
    with pytest.raises(shards.ShardError, match="val_000000.bin"):
        shards.read_split(str(out), "val")
    with pytest.raises(shards.ShardError, match="manifest says 7"):
        shards.read_tokens(str(out / "train_000000.bin"), expected_tokens=7)


@pytest.mark.slow
def test_the_stage_reads_and_writes_object_storage(tmp_path, prose_texts):
    """s3:// in and out, against a real S3 API (moto's server) on 127.0.0.1."""
    moto_server = pytest.importorskip("moto.server")
    import boto3

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
               "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
        s3.create_bucket(Bucket="corpus")
        body = "".join(json.dumps({"text": t}) + "\n" for t in prose_texts[:200]).encode()
        s3.put_object(Bucket="corpus", Key="web/part-0.jsonl", Body=body)
        # near dedup on: its Ray tasks read the pieces' band keys from the run directory on S3
        run_cli("tokenization/run.py", "--input", "s3://corpus/web/*.jsonl", "--output", "s3://corpus/tokens",
                "tokenization.piece_bytes=65536", "tokenization.near_dedup=true", env=env)
        local = tmp_path / "local"
        (tmp_path / "c.jsonl").write_bytes(body)
        run_cli("tokenization/run.py", "--input", str(tmp_path / "c.jsonl"), "--output", str(local),
                "tokenization.piece_bytes=65536", "tokenization.near_dedup=true")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="corpus", Prefix="tokens/")["Contents"]}
        assert {f"tokens/{name}" for name in tree_bytes(local)} == keys  # no _work/ left behind
        for name, data in tree_bytes(local).items():
            if name != "manifest.json":  # the manifest records the input's URL, which differs
                assert s3.get_object(Bucket="corpus", Key=f"tokens/{name}")["Body"].read() == data
        verify = run_cli("tokenization/run.py", "verify", "s3://corpus/tokens", env=env)
        assert "shards intact" in verify.stdout
        # a mixture on object storage: the web source's shards are the single input's, byte for byte
        books = "".join(json.dumps({"text": t}) + "\n" for t in prose_texts[200:230]).encode()
        s3.put_object(Bucket="corpus", Key="books/part-0.jsonl", Body=books)
        run_cli("tokenization/run.py", "--output", "s3://corpus/mix", "tokenization.piece_bytes=65536",
                'data.sources=[{name: web, input: "s3://corpus/web/*.jsonl", weight: 3}, '
                '{name: books, input: "s3://corpus/books/*.jsonl", weight: 1}]', env=env)
        mixed = json.loads(s3.get_object(Bucket="corpus", Key="mix/manifest.json")["Body"].read())
        assert [(s["file"], s["source"]) for s in mixed["shards"]] == [
            ("web-train_000000.bin", "web"), ("web-val_000000.bin", "web"), ("books-train_000000.bin", "books")]
        for split in ("train", "val"):
            assert s3.get_object(Bucket="corpus", Key=f"mix/web-{split}_000000.bin")["Body"].read() == \
                (local / f"{split}_000000.bin").read_bytes()
        assert mixed["sources"][1]["documents"] == {"train": 30, "val": 0}
        assert "3/3 shards intact" in run_cli("tokenization/run.py", "verify", "s3://corpus/mix", env=env).stdout
    finally:
        server.stop()
