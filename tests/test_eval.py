"""Evaluation against its references: lm-evaluation-harness for HellaSwag, transformers for the
validation loss, and the generation and checkpoint-loading contracts."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import run_cli, tiny_config

from eval import generate, hellaswag, val_loss
from pipeline.core.model import checkpoints
from pipeline.core.model.checkpoints import CheckpointError
from pipeline.core.model.gpt2 import GPT, GPTConfig, save_hf
from tokenization.tokenizer import encoding

CACHE = Path(os.environ["TIKTOKEN_CACHE_DIR"])
ENCODER_JSON, VOCAB_BPE = "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6", "6d1cbeee0f20b3d9449abfede4726ed8212e3aee"


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory) -> Path:
    """A tiny random GPT-2 in Hugging Face's layout, with GPT-2's tokenizer files beside it."""
    from transformers import GPT2Tokenizer

    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(11)
    save_hf(GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=128)), d)
    shutil.copy(CACHE / ENCODER_JSON, d / "vocab.json")
    shutil.copy(CACHE / VOCAB_BPE, d / "merges.txt")
    GPT2Tokenizer(vocab=str(d / "vocab.json"), merges=str(d / "merges.txt")).save_pretrained(d)
    return d


def run_harness(model_dir: Path, items: Path, tmp_path: Path) -> dict:
    """lm-evaluation-harness's own hellaswag task (its process_docs, its scoring) on a local file."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    upstream = Path(lm_eval.tasks.__file__).parent / "hellaswag"  # the harness's own task definition

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(upstream / "utils.py", tasks / "utils.py")
    (tasks / "hellaswag_local.yaml").write_text(f"""task: hellaswag_local
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {items}
output_type: multiple_choice
validation_split: validation
process_docs: !function utils.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
                                   tasks=["hellaswag_local"], task_manager=TaskManager(include_path=str(tasks)),
                                   batch_size=4, log_samples=True)


@pytest.mark.slow
def test_hellaswag_matches_lm_evaluation_harness_exactly(hf_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    items_file = hellaswag.SMOKE  # mixed-case ctx_b, [title], [step], [header], [substeps]
    theirs = run_harness(hf_model_dir, items_file, tmp_path)
    model, _ = checkpoints.load(str(hf_model_dir))
    items, _ = hellaswag.load(str(items_file))
    scores = hellaswag.score(model, encoding().encode_ordinary, items, torch.device("cpu"), model.config.block_size)
    ours = hellaswag.metrics(items, scores)

    samples = sorted(theirs["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    their_lls = np.array([[r[0][0] for r in s["resps"]] for s in samples])
    assert their_lls.shape == (len(items), 4)
    np.testing.assert_allclose(scores["harness"]["loglikelihoods"], their_lls, atol=1e-4, rtol=0)
    assert ours["hellaswag/harness/acc"] == pytest.approx(theirs["results"]["hellaswag_local"]["acc,none"], abs=1e-12)
    assert ours["hellaswag/harness/acc_norm"] == pytest.approx(theirs["results"]["hellaswag_local"]["acc_norm,none"], abs=1e-12)
    # our packed scoring gave the harness's numbers; the completion protocol is computed, and different
    assert set(ours) >= {"hellaswag/completion/acc", "hellaswag/completion/acc_norm"}
    assert not np.allclose(scores["completion"]["loglikelihoods"], scores["harness"]["loglikelihoods"])


def test_completion_style_is_build_nanogpts_computation(hf_model_dir):
    """build-nanogpt's rendering (raw ctx, " " + ending, masked per-token loss) written out here."""
    model, _ = checkpoints.load(str(hf_model_dir))
    items, _ = hellaswag.load("smoke")
    enc = encoding()
    expected_acc, expected_norm = [], []
    for item in items:
        ctx = enc.encode_ordinary(item.ctx)
        rows = [ctx + enc.encode_ordinary(" " + e) for e in item.endings]
        width = max(map(len, rows))
        tokens = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[0] * len(ctx) + [1] * (len(r) - len(ctx)) + [0] * (width - len(r)) for r in rows])
        with torch.no_grad():
            logits = model(tokens)[0][..., :50257]
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
        losses = losses * mask[:, 1:]
        expected_acc.append(int(losses.sum(1).argmin() == item.label))
        expected_norm.append(int((losses.sum(1) / mask[:, 1:].sum(1)).argmin() == item.label))
    ours = hellaswag.metrics(items, hellaswag.score(model, enc.encode_ordinary, items, torch.device("cpu"),
                                                    model.config.block_size, protocols=("completion",)))
    assert ours["hellaswag/completion/acc"] == np.mean(expected_acc)
    assert ours["hellaswag/completion/acc_norm"] == np.mean(expected_norm)


@pytest.mark.slow
def test_items_too_long_for_the_context_are_truncated_as_the_harness_does(hf_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    long = tmp_path / "long.jsonl"
    rows = [json.loads(line) for line in hellaswag.SMOKE.read_text().splitlines()[:4]]
    for row in rows:  # contexts longer than the model's 128-token window
        row["ctx_a"] = " ".join([row["ctx_a"]] * 12)
        row["ctx"] = row["ctx_a"] + " " + row["ctx_b"]
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    theirs = run_harness(hf_model_dir, long, tmp_path)
    model, _ = checkpoints.load(str(hf_model_dir))
    items, _ = hellaswag.load(str(long))
    scores = hellaswag.score(model, encoding().encode_ordinary, items, torch.device("cpu"), 128, protocols=("harness",))
    samples = sorted(theirs["samples"]["hellaswag_local"], key=lambda s: s["doc_id"])
    np.testing.assert_allclose(scores["harness"]["loglikelihoods"],
                               [[r[0][0] for r in s["resps"]] for s in samples], atol=1e-4, rtol=0)


def test_hellaswag_files_in_both_layouts_and_the_official_checksum_rule(tmp_path):
    lines = hellaswag.SMOKE.read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    pq.write_table(pa.table({k: [str(r[k]) if k == "label" else r[k] for r in rows] for k in rows[0]}),
                   tmp_path / "validation.parquet")
    from_jsonl, info_jsonl = hellaswag.load(str(hellaswag.SMOKE))
    from_parquet, info_parquet = hellaswag.load(str(tmp_path / "validation.parquet"))
    assert from_jsonl == from_parquet and len(from_jsonl) == 16
    assert not info_jsonl["official_validation_set"] and not info_parquet["official_validation_set"]
    # the Hub's parquet is accepted as official when it reproduces the released JSONL byte for byte
    parquet_rows = hellaswag._parquet_rows(str(tmp_path / "validation.parquet"))
    assert hellaswag._canonical_jsonl(parquet_rows, ensure_ascii=True).decode() == "\n".join(lines) + "\n"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(lines[0] + "\n" + '{"ctx": "no endings"}\n')
    with pytest.raises(hellaswag.HellaSwagError, match=f"{bad}:2: not a HellaSwag item"):
        hellaswag.load(str(bad))
    assert hellaswag.load("smoke", limit=3)[1]["items"] == 3


def test_harness_preprocessing_follows_the_task_definition():
    item = hellaswag.Item("Home and Garden", "[header] How to x [title] Do a thing.", "[step] push  it",
                          "", ("the  door [substeps] wide.",) * 4, 0)
    context, choices = hellaswag.harness_texts(item)
    assert context == "Home and Garden: How to x. Do a thing. push it"  # capitalize() only uppercases the "["
    assert choices[0] == "the door wide."


# --- validation loss ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_val_loss_equals_transformers_on_the_same_tokens(hf_model_dir, builtin_dataset, tmp_path):
    from transformers import GPT2LMHeadModel

    x, y = val_loss.val_sequences(str(builtin_dataset), seq_len=64, max_tokens=4096)
    model, _ = checkpoints.load(str(hf_model_dir))
    ours = val_loss.evaluate(lambda idx, tgt: model(idx, tgt)[1], x, y, micro_batch=16, device=torch.device("cpu"))
    reference = GPT2LMHeadModel.from_pretrained(hf_model_dir).eval()
    with torch.no_grad():
        logits = reference(x).logits
    expected = F.cross_entropy(logits.flatten(0, 1), y.flatten()).item()
    assert ours["tokens"] == 4096 and ours["loss"] == pytest.approx(expected, abs=1e-5)
    assert torch.equal(x[1:, 0], y[:-1, -1])  # consecutive windows of the val split

    out = tmp_path / "out"
    run_cli("eval/run.py", "--ckpt", str(hf_model_dir), "--data", str(builtin_dataset), "--val-tokens", "4096",
            "--hellaswag", "smoke", "--max-new-tokens", "8", "--output", str(out), "batch.seq_len=64")
    results = json.loads((out / "results.json").read_text())
    assert results["val"]["loss"] == pytest.approx(expected, abs=1e-5) and results["val"]["tokens"] == 4096
    assert results["hellaswag"]["data"]["items"] == 16 and "hellaswag/harness/acc_norm" in results["metrics"]
    assert len(results["samples"][0]["completions"]) == 2
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the checkpoint's figure beside them


# --- generation ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model() -> GPT:
    torch.manual_seed(5)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=64)).eval()


def test_greedy_with_the_cache_equals_greedy_without(small_model):
    prompt = encoding().encode_ordinary("Hello, I'm a language model,")
    cached = generate.sample(small_model, prompt, 24, greedy=True)
    plain = generate.sample(small_model, prompt, 24, greedy=True, use_cache=False)
    assert cached == plain and len(cached[0]) > 0
    manual, idx = [], list(prompt)
    with torch.no_grad():
        for _ in range(len(cached[0])):
            nxt = int(small_model(torch.tensor([idx]))[0][0, -1, :50257].argmax())
            manual.append(nxt)
            idx.append(nxt)
    assert cached[0] == manual


def test_top_k_1_and_one_beam_are_greedy_and_a_seed_reproduces_a_sample(small_model):
    prompt = encoding().encode_ordinary("The quick brown fox")
    greedy = generate.sample(small_model, prompt, 20, greedy=True)[0]
    assert generate.sample(small_model, prompt, 20, top_k=1, seed=1)[0] == greedy
    assert generate.sample(small_model, prompt, 20, top_k=1, seed=2)[0] == greedy
    assert generate.beam_search(small_model, prompt, 20, num_beams=1) == greedy
    a = generate.sample(small_model, prompt, 20, temperature=1.0, top_p=0.9, num_samples=3, seed=7)
    assert a == generate.sample(small_model, prompt, 20, temperature=1.0, top_p=0.9, num_samples=3, seed=7)
    assert a != generate.sample(small_model, prompt, 20, temperature=1.0, top_p=0.9, num_samples=3, seed=8)
    beams = generate.beam_search(small_model, prompt, 20, num_beams=4)

    def score(tokens: list[int]) -> float:
        logits = small_model(torch.tensor([prompt + tokens]))[0][0, len(prompt) - 1:-1, :50257]
        return float(torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens)[:, None]).sum())

    with torch.no_grad():
        assert score(beams[:len(greedy)]) >= score(greedy[:len(beams)]) - 1e-4  # beams find at least greedy's likelihood
    with pytest.raises(ValueError, match="exceeds the model's context"):
        generate.sample(small_model, prompt, 100)


# --- checkpoints ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, builtin_dataset):
    """A ZeRO-3 run of two workers (parameters partitioned), scoring HellaSwag during training."""
    from train import launch

    cfg = tiny_config(tmp_path_factory.mktemp("trained"), builtin_dataset, "deepspeed.zero_stage=3", "train.max_steps=6",
                      "eval.hellaswag=smoke", "eval.hellaswag_interval=3", "checkpoint.interval=3",
                      "eval.interval=3", "eval.val_tokens=2048")
    launch.run(cfg)
    return cfg


@pytest.mark.slow
def test_the_trainers_hellaswag_equals_eval_run_on_the_same_checkpoint(trained):
    from pipeline.core.tracking import read_jsonl

    logged = [r for r in read_jsonl(trained.metrics_file) if "hellaswag/harness/acc" in r]
    assert [r["step"] for r in logged] == [3, 6]
    model, _ = checkpoints.load(trained.checkpoint_dir)
    items, _ = hellaswag.load("smoke")
    ours = hellaswag.metrics(items, hellaswag.score(model, encoding().encode_ordinary, items, torch.device("cpu"),
                                                    model.config.block_size))
    for key, value in ours.items():
        assert logged[-1][key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.slow
def test_every_checkpoint_layout_loads_to_the_same_model(trained, hf_model_dir, tmp_path):
    step = Path(trained.checkpoint_dir) / "step_00000006"
    idx = torch.randint(0, 50257, (2, 32))
    models = {name: checkpoints.load(str(path))[0]
              for name, path in {"trainer dir": trained.checkpoint_dir, "step dir": step,
                                 "deepspeed dir": step / "deepspeed", "deepspeed tag": step / "deepspeed" / "state",
                                 "hf file": step / "model.safetensors"}.items()}
    with torch.no_grad():
        logits = {name: m(idx)[0][..., :50257] for name, m in models.items()}
    for name, value in logits.items():
        assert torch.equal(value, logits["trainer dir"]), name
    # pytorch_model.bin, read with weights_only=True
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(hf_model_dir).eval()
    (tmp_path / "bin").mkdir()
    shutil.copy(hf_model_dir / "config.json", tmp_path / "bin" / "config.json")
    torch.save(hf.state_dict(), tmp_path / "bin" / "pytorch_model.bin")  # the older HF layout
    ours, info = checkpoints.load(str(tmp_path / "bin"))
    assert info["weights"].endswith("pytorch_model.bin")
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0][..., :50257], hf(idx).logits, atol=1e-5)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ.get('PWNED_MARKER', '/tmp/pwned')}",))


@pytest.mark.slow
def test_bad_checkpoints_get_clear_errors_and_nothing_is_unpickled(hf_model_dir, trained, tmp_path, monkeypatch):
    def error(spec) -> str:
        with pytest.raises(CheckpointError) as err:
            checkpoints.load(str(spec))
        return str(err.value)

    assert "no such file or directory" in error(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hi")
    assert "a file; --ckpt takes a directory" in error(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    assert "unknown checkpoint layout; found an empty directory; expected one of" in error(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "weights.npz").write_bytes(b"x")
    assert "found ['weights.npz']" in error(tmp_path / "odd")
    wrong = tmp_path / "wrong"
    shutil.copytree(hf_model_dir, wrong)
    config = json.loads((wrong / "config.json").read_text())
    (wrong / "config.json").write_text(json.dumps({**config, "n_embd": 64}))
    message = error(wrong)
    assert "weights do not fit" in message and "transformer.wte.weight: found (50304, 32), expected (50304, 64)" in message
    (wrong / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    assert "describes a 'bert' model" in error(wrong)
    uncommitted = tmp_path / "uncommitted"
    shutil.copytree(Path(trained.checkpoint_dir) / "step_00000006", uncommitted / "step_00000006")
    (uncommitted / "step_00000006" / "trainer_state.json").unlink()
    assert "no committed checkpoint here" in error(uncommitted)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "cannot download from the Hugging Face Hub" in error("hf:gpt2")

    marker = tmp_path / "pwned"
    monkeypatch.setenv("PWNED_MARKER", str(marker))
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(hf_model_dir / "config.json", evil / "config.json")
    with open(evil / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _Payload()}, f)
    with pytest.raises(Exception) as err:
        checkpoints.load(str(evil))
    assert not marker.exists() and "weights only load failed" in str(err.value).lower()

    proc = run_cli("eval/run.py", "--ckpt", str(tmp_path / "empty"), check=False)
    assert proc.returncode == 2 and "unknown checkpoint layout" in proc.stderr
