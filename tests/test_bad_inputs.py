"""Every bad input a careless user or an attacker gives gets a clear answer: corpus damage is skipped and counted
with file:line where the file can still be read past it, and the rest is one line, exit 2, naming the input."""

from __future__ import annotations

import gzip
import json
import os

import pytest
from conftest import run_cli

from pipeline.core.config import ConfigError, load_config
from tokenization import sources
from tokenization.sources import CorpusError

GOOD = [{"text": f"A perfectly ordinary document, number {i}, about nothing in particular."} for i in range(40)]


def read_all(*paths) -> tuple[list[str], list[tuple[str, str]]]:
    """The texts and (reason, file:line) of every skipped record of the inputs, as the tokenizer reads them."""
    data = load_config("smoke", [], {"data.input": [str(p) for p in paths]}).data
    source = sources.resolve(data)
    texts, skipped = [], []
    for piece in sources.plan(source, data, 1 << 20):
        reader = sources.PieceReader(source, piece, data, 1_000_000)
        for doc in reader:
            if doc.reason:
                skipped.append((doc.reason, reader.locate(doc.where)))
            else:
                texts.append(doc.text)
    return texts, skipped


def jsonl_gz(path, records) -> bytes:
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in records).encode())
    path.write_bytes(data)
    return data


def test_a_truncated_gzip_keeps_what_reads_and_counts_the_rest_at_its_line(tmp_path):
    data = jsonl_gz(tmp_path / "cut.jsonl.gz", GOOD)
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])  # the download died part-way
    texts, skipped = read_all(tmp_path / "cut.jsonl.gz")
    assert 0 < len(texts) < len(GOOD) and texts == [r["text"] for r in GOOD[: len(texts)]]
    assert skipped == [("unreadable", f"{tmp_path / 'cut.jsonl.gz'}:{len(texts) + 1}")]


def test_a_gz_that_is_not_gzip_is_counted_and_the_other_files_are_read(tmp_path):
    (tmp_path / "fake.jsonl.gz").write_bytes(b'{"text": "plain bytes, not gzip"}\n')
    jsonl_gz(tmp_path / "good.jsonl.gz", GOOD)
    texts, skipped = read_all(tmp_path)
    assert texts == [r["text"] for r in GOOD]
    assert skipped == [("unreadable", f"{tmp_path / 'fake.jsonl.gz'}:1")]


def test_a_deeply_nested_json_line_is_malformed_json_at_its_line(tmp_path):
    lines = [json.dumps(GOOD[0]), '{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", json.dumps(GOOD[1])]
    (tmp_path / "deep.jsonl").write_text("\n".join(lines) + "\n")
    texts, skipped = read_all(tmp_path / "deep.jsonl")
    assert texts == [GOOD[0]["text"], GOOD[1]["text"]]
    assert skipped == [("malformed_json", f"{tmp_path / 'deep.jsonl'}:2")]


def test_a_corrupt_parquet_file_is_refused_naming_it(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + os.urandom(2000))
    with pytest.raises(CorpusError, match=rf"{tmp_path / 'broken.parquet'}: not a readable Parquet file"):
        read_all(tmp_path / "broken.parquet")


def test_a_fifo_is_refused_instead_of_hanging(tmp_path):
    os.mkfifo(tmp_path / "pipe.jsonl")
    with pytest.raises(CorpusError, match=r"pipe\.jsonl' is not a regular file"):
        read_all(tmp_path / "pipe.jsonl")
    (tmp_path / "dir").mkdir()
    jsonl_gz(tmp_path / "dir" / "good.jsonl.gz", GOOD)
    os.mkfifo(tmp_path / "dir" / "also.jsonl")
    with pytest.raises(CorpusError, match=r"also\.jsonl' is not a regular file"):
        read_all(tmp_path / "dir")


@pytest.mark.parametrize("override, message", [
    ("train.lr=[", r"override 'train\.lr=\[': not valid YAML at line 1, column 2"),
    ("train.lr=!!python/object/apply:os.system [touch /tmp/pwned]", r"could not determine a constructor"),
])
def test_a_malformed_or_unsafe_override_is_a_config_error(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])


def test_a_preset_with_a_python_tag_is_refused_naming_the_file(tmp_path):
    preset = tmp_path / "evil.yaml"
    preset.write_text("extends: smoke\ntrain: !!python/object/apply:os.system [touch /tmp/pwned]\n")
    with pytest.raises(ConfigError, match=rf"preset {preset}: not valid YAML at line 2"):
        load_config(str(preset))


def test_the_commands_answer_bad_input_in_one_line_with_exit_2(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"PAR1" + os.urandom(2000))
    cases = [
        (["tokenization/run.py", "--config", "smoke", "--input", str(tmp_path / "broken.parquet"),
          "--output", str(tmp_path / "out")], "broken.parquet: not a readable Parquet file"),
        (["pipeline/run.py", "train.lr=[", "--stages", "tokenize"], "override 'train.lr=[': not valid YAML"),
        (["train/run.py", "--config", "smoke", "--plan", "model.n_head=5"], "model.n_embd"),
    ]
    for argv, message in cases:
        proc = run_cli(*argv, check=False, timeout=120)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (argv, proc.stderr)


def test_overrides_may_come_before_the_options():
    from pipeline.core.config import CommandParser

    parser = CommandParser(prog="x")
    parser.add_argument("--stages")
    parser.add_overrides()
    args = parser.parse_args(["train.lr=3e-4", "--stages", "train", "model.n_layer=2"])
    assert args.stages == "train" and args.overrides == ["train.lr=3e-4", "model.n_layer=2"]


class _Planted:
    def __reduce__(self):
        return (os.system, ("touch /tmp/gpt2-pipeline-pwned",))


def test_eval_refuses_a_pickle_and_damaged_weights_in_one_line(tmp_path, capsys):
    import pickle
    import shutil

    import eval.run
    from pipeline.core.model.gpt2 import GPT, GPTConfig, save_hf

    good = tmp_path / "good"
    save_hf(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16)), good)
    pickled, truncated = tmp_path / "pickled", tmp_path / "truncated"
    shutil.copytree(good, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps({"transformer.wte.weight": _Planted()}))
    shutil.copytree(good, truncated)
    weights = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    base = ["--config", "smoke", "--no-val", "--hellaswag", "none", "--prompt", "Hi"]
    for ckpt, name in ((pickled, "pytorch_model.bin"), (truncated, "model.safetensors")):
        assert eval.run.main([*base, "--ckpt", str(ckpt)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{ckpt / name}: not readable weights" in err, err
    assert not os.path.exists("/tmp/gpt2-pipeline-pwned")  # nothing was unpickled
