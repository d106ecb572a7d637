"""Manifests and checkpoint records are hostile input: every field is checked before it names a file, a
cache path or a tensor size, and a bad one is refused naming the file and the field."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from pipeline.core.model import checkpoints
from pipeline.core.model.checkpoints import CheckpointError
from pipeline.core.model.gpt2 import GPT, GPTConfig, save_hf
from tokenization import shards
from tokenization.shards import ShardError


def dataset(directory, tokens: int = 3000) -> dict:
    """One train shard of random tokens and its manifest (no Ray, no tokenizer)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    digest = shards.write_shard(str(directory / "train_000000.bin"), [rng.integers(0, 50257, tokens, dtype=np.uint16)],
                                tokens)
    manifest = {"format_version": shards.MANIFEST_VERSION, "shards": [
        {"file": "train_000000.bin", "split": "train", "tokens": tokens, "documents": 1, "sha256": digest}]}
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    return manifest


TAMPERED = [  # (field, value, message)
    ("sha256", "../../../victim", r"shards\[0\]\.sha256: must be 64 lowercase hex digits"),
    ("sha256", "A" * 64, r"shards\[0\]\.sha256"),
    ("file", "../../../../etc/passwd", r"shards\[0\]\.file: must be a bare file name"),
    ("file", "/etc/passwd", r"shards\[0\]\.file"),
    ("file", "..", r"shards\[0\]\.file"),
    ("tokens", -5, r"shards\[0\]\.tokens: must be a non-negative integer"),
    ("tokens", "12", r"shards\[0\]\.tokens"),
    ("documents", True, r"shards\[0\]\.documents"),
    ("split", "test", r"shards\[0\]\.split: must be one of train, val"),
]


def tamper(directory, manifest: dict, field: str, value) -> None:
    bad = json.loads(json.dumps(manifest))
    bad["shards"][0][field] = value
    (directory / shards.MANIFEST).write_text(json.dumps(bad))


@pytest.mark.parametrize("field, value, message", TAMPERED)
def test_a_tampered_local_manifest_is_refused_naming_the_field(tmp_path, field, value, message):
    data = tmp_path / "data"
    manifest = dataset(data)
    tamper(data, manifest, field, value)
    with pytest.raises(ShardError, match=rf"{data / shards.MANIFEST}: {message}"):
        shards.local_split(str(data), "train", str(tmp_path / "cache"))


def test_other_manifest_damage_is_named(tmp_path):
    data = tmp_path / "data"
    manifest = dataset(data)
    (data / shards.MANIFEST).write_text("{not json")
    with pytest.raises(ShardError, match="not a JSON manifest"):
        shards.load_manifest(str(data))
    for bad, message in (([], "manifest: must be a JSON object"), ({**manifest, "shards": {}}, "shards: must be a list"),
                         ({**manifest, "shards": [{**manifest["shards"][0], "extra": 1}]}, r"shards\[0\]: must be an object"),
                         ({**manifest, "totals": {"train": {"tokens": -1}}}, r"totals\.train\.tokens"),
                         ({**manifest, "skipped": {"malformed_json": -2}}, r"skipped\.malformed_json")):
        (data / shards.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(ShardError, match=message):
            shards.load_manifest(str(data))


def mixture(directory) -> dict:
    """dataset()'s shard as the one shard of source 'web' of a mixture of data.sources."""
    manifest = dataset(directory)
    manifest["shards"][0]["source"] = "web"
    manifest["sources"] = [{"name": "web", "input": {"kind": "files"}, "documents": {"train": 1, "val": 0},
                            "tokens": {"train": 3000, "val": 0}, "shards": {"train": 1, "val": 0}}]
    (directory / shards.MANIFEST).write_text(json.dumps(manifest))
    return manifest


def test_a_mixture_manifest_is_read_by_source_and_its_tampered_source_fields_are_refused(tmp_path):
    data = tmp_path / "data"
    manifest = mixture(data)
    assert shards.source_names(shards.load_manifest(str(data))) == ["web"]
    assert [n for _, n in shards.local_split(str(data), "train", source="web")] == [3000]
    assert shards.local_split(str(data), "val", source="web") == []
    with pytest.raises(ShardError, match=r"source 'books' is not in the dataset \(sources: web\)"):
        shards.local_split(str(data), "train", source="books")

    def edited(edit):
        bad = json.loads(json.dumps(manifest))
        edit(bad)
        return bad

    single = {k: v for k, v in manifest.items() if k != "sources"}
    cases = [
        (edited(lambda m: m["sources"][0].update(name="../../etc")), r"sources\[0\]\.name: must be a distinct source name"),
        (edited(lambda m: m["sources"][0].update(name="Web")), r"sources\[0\]\.name"),
        (edited(lambda m: m["sources"].append(m["sources"][0])), r"sources\[1\]\.name: must be a distinct"),
        (edited(lambda m: m.update(sources=[])), "sources: must be a non-empty list"),
        (edited(lambda m: m.update(sources={"web": {}})), "sources: must be a non-empty list"),
        (edited(lambda m: m["sources"][0].update(extra=1)), r"sources\[0\]: must be an object with exactly"),
        (edited(lambda m: m["sources"][0].update(input="s3://x")), r"sources\[0\]\.input: must be an object"),
        (edited(lambda m: m["sources"][0]["tokens"].update(train=-1)), r"sources\[0\]\.tokens\.train: must be a non-neg"),
        (edited(lambda m: m["sources"][0]["documents"].update(val="0")), r"sources\[0\]\.documents\.val"),
        (edited(lambda m: m["sources"][0]["shards"].update(val=True)), r"sources\[0\]\.shards\.val"),
        (edited(lambda m: m["sources"][0]["shards"].pop("val")), r"sources\[0\]\.shards: must be an object with exactly"),
        (edited(lambda m: m["shards"][0].update(source="books")), r"shards\[0\]\.source: must be one of the manifest's"),
        (edited(lambda m: m["shards"][0].pop("source")), r"shards\[0\]: must be an object with exactly"),
        (single, r"shards\[0\]: must be an object with exactly documents, file, sha256, split, tokens"),
    ]
    for bad, message in cases:
        (data / shards.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(ShardError, match=message):
            shards.local_split(str(data), "train", source="web")


@pytest.mark.slow
def test_a_tampered_manifest_on_object_storage_deletes_and_reads_nothing_on_the_node(s3_server, tmp_path, monkeypatch):
    import boto3

    for key, value in s3_server.items():
        monkeypatch.setenv(key, value)
    s3 = boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1")
    local, cache = tmp_path / "local", tmp_path / "node" / "cache"
    manifest = dataset(local)
    # the attack of the report: a sha256 that walks out of the node cache onto a file the worker would delete
    victim = tmp_path / "node" / "victim.bin"
    victim.parent.mkdir(parents=True)
    victim.write_bytes(b"precious")
    for field, value in (("sha256", "../victim"), ("file", "../../../../etc/passwd")):
        tamper(local, manifest, field, value)
        for f in local.iterdir():
            s3.upload_file(str(f), "runs", f"hostile/{f.name}")
        with pytest.raises(ShardError, match=rf"s3://runs/hostile/manifest.json: shards\[0\]\.{field}"):
            shards.local_split("s3://runs/hostile", "train", str(cache))
        assert victim.read_bytes() == b"precious" and not (victim.parent / "victim.bin.lock").exists()
        assert not cache.exists() or not os.listdir(cache)


def checkpoint(directory) -> str:
    step = directory / checkpoints.step_name(4)
    torch.manual_seed(0)
    save_hf(GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32)), step)
    state = checkpoints.TrainerState(step=4, sequences=64, tokens=2048, world_size=2, zero_stage=1,
                                     manifest_sha256="ab" * 32, data_order="feistel-v1", run_id="0123abcd", loss=5.5)
    (step / checkpoints.STATE).write_text(json.dumps(state.__dict__))
    return str(step)


@pytest.mark.parametrize("field, value", [("step", -1), ("world_size", 0), ("zero_stage", 7), ("sequences", "64"),
                                          ("manifest_sha256", "../x"), ("run_id", "../../etc"), ("loss", "nan")])
def test_a_damaged_trainer_state_is_refused_naming_file_and_field(tmp_path, field, value):
    url = checkpoint(tmp_path)
    good = checkpoints.TrainerState.read(url)
    assert good.step == 4 and good.world_size == 2 and good.loss == 5.5
    path = os.path.join(url, checkpoints.STATE)
    record = json.loads(open(path).read())
    record[field] = value
    open(path, "w").write(json.dumps(record))
    with pytest.raises(CheckpointError, match=rf"{path}: {field}: must be"):
        checkpoints.TrainerState.read(url)
    open(path, "w").write("garbage{")
    with pytest.raises(CheckpointError, match=rf"{path}: not a JSON trainer state"):
        checkpoints.TrainerState.read(url)


def record_files(url: str) -> dict:
    """Record the checkpoint's files in its commit, as the trainer does."""
    import hashlib

    files = {name: {"size": os.path.getsize(os.path.join(url, name)),
                    "sha256": hashlib.sha256(open(os.path.join(url, name), "rb").read()).hexdigest()}
             for name in os.listdir(url) if name != checkpoints.STATE}
    path = os.path.join(url, checkpoints.STATE)
    state = json.loads(open(path).read())
    open(path, "w").write(json.dumps({**state, "files": files}))
    return files


@pytest.mark.parametrize("name, entry, message", [
    ("../outside", {"size": 1, "sha256": "ab" * 32}, "is not a file name inside the checkpoint"),
    ("/etc/passwd", {"size": 1, "sha256": "ab" * 32}, "is not a file name inside the checkpoint"),
    ("config.json", {"size": -1, "sha256": "ab" * 32}, "config.json: must be"),
    ("config.json", {"size": 1, "sha256": "../x"}, "config.json: must be"),
    ("config.json", "big", "config.json: must be")])
def test_a_damaged_file_record_is_refused_naming_the_field_and_never_names_a_path(tmp_path, name, entry, message):
    url = checkpoint(tmp_path)
    assert checkpoints.damage(url) is None  # a checkpoint from before the records: nothing to compare
    record_files(url)
    assert checkpoints.damage(url) is None
    path = os.path.join(url, checkpoints.STATE)
    state = json.loads(open(path).read())
    state["files"][name] = entry
    open(path, "w").write(json.dumps(state))
    with pytest.raises(CheckpointError, match=rf"{path}: files: .*{message}"):
        checkpoints.recorded_files(url)
    assert path in checkpoints.damage(url) and message.split(":")[-1] in checkpoints.damage(url)
    with pytest.raises(CheckpointError, match="damaged checkpoint, refused"):
        checkpoints.load(url)


def test_a_missing_file_or_garbage_commit_is_damage_naming_the_file(tmp_path):
    url = checkpoint(tmp_path)
    record_files(url)
    os.remove(os.path.join(url, "config.json"))
    assert checkpoints.damage(url) == f"{os.path.join(url, 'config.json')}: missing"
    open(os.path.join(url, checkpoints.STATE), "w").write("garbage{")
    assert checkpoints.damage(url).startswith(f"{os.path.join(url, checkpoints.STATE)}: not a JSON trainer state")


@pytest.mark.parametrize("edit, message", [({"n_head": 3}, r"n_embd \(16\) must be a multiple of n_head \(3\)"),
                                           ({"n_layer": -2}, "n_layer must be a positive integer"),
                                           ({"n_embd": [16]}, "n_embd must be a positive integer"),
                                           ({"vocab_size": 60000}, "vocab_size 60000 exceeds the 50257 rows")])
def test_a_config_json_that_cannot_describe_the_weights_is_refused_naming_it(tmp_path, edit, message):
    url = checkpoint(tmp_path)
    config = os.path.join(url, "config.json")
    original = json.loads(open(config).read())
    open(config, "w").write(json.dumps({**original, **edit}))
    with pytest.raises(CheckpointError, match=message):
        checkpoints.load(url)
