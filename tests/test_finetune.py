"""Fine-tuning: task data from JSONL, Parquet and a datasets directory, its errors, held-out metrics
against scikit-learn and SciPy; the stage on DeepSpeed under Ray Train (slow)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import killing_a_worker_after, write_jsonl
from scipy.stats import pearsonr
from sklearn.metrics import f1_score

from pipeline.core.config import load_config
from pipeline.core.model.heads import IGNORE, HeadSpec
from tokenization.tokenizer import encoding
from train import tasks
from train.tasks import TaskError


def finetune_cfg(*overrides: str):
    return load_config("smoke", list(overrides)).finetune


def encode(text: str) -> list[int]:
    return encoding().encode_ordinary(text)


RECORDS = [{"sentence": f"sentence number {i} is {'good' if i % 2 else 'bad'}", "extra": "second part",
            "label": i % 2, "score": i / 10} for i in range(60)]


def test_jsonl_task_is_encoded_split_by_content_and_truncated(tmp_path):
    write_jsonl(tmp_path / "task.jsonl", RECORDS)
    f = finetune_cfg(f"finetune.task={tmp_path / 'task.jsonl'}", "finetune.text_fields=[sentence, extra]",
                     "finetune.max_len=40", "finetune.eval_fraction=0.25")
    train, held = tasks.load(f, "train", encode), tasks.load(f, "eval", encode)
    assert len(train.examples) + len(held.examples) == 60 and 5 <= len(held.examples) <= 25
    inputs = {tuple(encode(r["sentence"] + "\n" + r["extra"])) for r in RECORDS}
    assert {e.ids for e in train.examples} | {e.ids for e in held.examples} == inputs
    assert not {e.ids for e in train.examples} & {e.ids for e in held.examples}
    assert train.truncated == held.truncated == 0
    short = tasks.load(f.model_copy(update={"max_len": 6}), "train", encode)
    assert short.truncated == len(short.examples) and {len(e.ids) for e in short.examples} == {6}
    # the same records in another order and another file give the same split
    write_jsonl(tmp_path / "shuffled.jsonl", RECORDS[::-1])
    again = tasks.load(f.model_copy(update={"task": str(tmp_path / "shuffled.jsonl")}), "eval", encode)
    assert sorted(e.ids for e in again.examples) == sorted(e.ids for e in held.examples)


def test_parquet_and_a_datasets_directory_read_like_jsonl(tmp_path):
    pq.write_table(pa.Table.from_pylist(RECORDS), tmp_path / "task.parquet")
    write_jsonl(tmp_path / "task.jsonl", RECORDS)
    f = finetune_cfg("finetune.text_fields=sentence", "finetune.head=regression", "finetune.label_field=score")
    from_parquet = tasks.load(f.model_copy(update={"task": str(tmp_path / "task.parquet")}), "train", encode)
    from_jsonl = tasks.load(f.model_copy(update={"task": str(tmp_path / "task.jsonl")}), "train", encode)
    assert from_parquet.examples == from_jsonl.examples and from_jsonl.examples[0].labels["task"] in {i / 10 for i in range(60)}

    hub = tmp_path / "hub"  # a dataset directory as `datasets` reads it (the Hub is offline here)
    hub.mkdir()
    write_jsonl(hub / "train.jsonl", RECORDS[:40])
    write_jsonl(hub / "validation.jsonl", RECORDS[40:])
    g = finetune_cfg(f"finetune.task=hf:{hub}", "finetune.text_fields=sentence")
    train, held = tasks.load(g, "train", encode), tasks.load(g, "eval", encode)
    assert [e.ids for e in held.examples] == [tuple(encode(r["sentence"])) for r in RECORDS[40:]]
    assert [e.labels["task"] for e in train.examples] == [r["label"] for r in RECORDS[:40]]
    with pytest.raises(TaskError, match="finetune.eval_split: 'test' not in dataset"):
        tasks.load(g.model_copy(update={"eval_split": "test"}), "eval", encode)


def test_token_labels_go_to_each_words_first_token(tmp_path):
    write_jsonl(tmp_path / "ner.jsonl", [{"words": ["Guido", "wrote", "Pythonesque", "code"], "tags": [1, 0, 2, 0]}])
    f = finetune_cfg(f"finetune.task={tmp_path / 'ner.jsonl'}", f"finetune.eval_task={tmp_path / 'ner.jsonl'}",
                     "finetune.head=token_classification", "finetune.num_labels=3", "finetune.text_fields=words",
                     "finetune.label_field=tags")
    (example,) = tasks.load(f, "eval", encode).examples
    pieces = [encode("Guido"), encode(" wrote"), encode(" Pythonesque"), encode(" code")]
    assert example.ids == tuple(t for p in pieces for t in p)
    expected = [IGNORE] * len(example.ids)
    at = 0
    for piece, tag in zip(pieces, [1, 0, 2, 0]):
        expected[at] = tag
        at += len(piece)
    assert example.labels["task"] == tuple(expected) and len(pieces[2]) > 1  # a word of several tokens


@pytest.mark.parametrize("record,overrides,message", [
    ({"text": "fine", "label": 2}, [], r"task\.jsonl:3: label field 'label' value 2 is outside 0\.\.1"),
    ({"text": "fine"}, [], r"task\.jsonl:3: no label field 'label'"),
    ({"body": "fine", "label": 0}, [], r"task\.jsonl:3: no text field 'text' \(finetune\.text_fields\)"),
    ({"text": "fine", "label": "x"}, ["finetune.head=regression"], r"task\.jsonl:3: label field 'label' must be a finite number"),
    ({"text": ["a", "b"], "label": [0]}, ["finetune.head=token_classification"], r"task\.jsonl:3: .*one label per word \(2 words\)"),
    ('{"text": "broken', [], r"task\.jsonl:3: malformed JSON"),
])
def test_bad_records_stop_the_job_naming_file_line_and_key(record, overrides, message, tmp_path):
    good = {"text": ["ok"], "label": [0]} if "finetune.head=token_classification" in overrides else {"text": "ok", "label": 1}
    write_jsonl(tmp_path / "task.jsonl", [good, good, record])
    f = finetune_cfg(f"finetune.task={tmp_path / 'task.jsonl'}", f"finetune.eval_task={tmp_path / 'task.jsonl'}", *overrides)
    with pytest.raises(TaskError, match=message):
        tasks.load(f, "eval", encode)


def test_the_source_fingerprint_follows_the_task_files(tmp_path):
    write_jsonl(tmp_path / "task.jsonl", RECORDS)
    f = finetune_cfg(f"finetune.task={tmp_path / 'task.jsonl'}")
    before = tasks.source_fingerprint(f)
    assert tasks.source_fingerprint(f) == before
    write_jsonl(tmp_path / "task.jsonl", RECORDS[:-1])
    assert tasks.source_fingerprint(f) != before
    write_jsonl(tmp_path / "held.jsonl", RECORDS[:5])
    assert tasks.source_fingerprint(f.model_copy(update={"eval_task": str(tmp_path / "held.jsonl")})) != before


def test_an_empty_split_and_missing_data_are_named(tmp_path):
    write_jsonl(tmp_path / "one.jsonl", [{"text": "only one record", "label": 0}])
    f = finetune_cfg(f"finetune.task={tmp_path / 'one.jsonl'}", "finetune.eval_fraction=0.01")
    with pytest.raises(TaskError, match=r"one\.jsonl \(eval part, finetune\.eval_fraction=0\.01\): the eval split is empty"):
        tasks.load(f, "eval", encode)
    with pytest.raises(TaskError, match="does not exist"):
        tasks.load(f.model_copy(update={"task": str(tmp_path / "nothing.jsonl")}), "train", encode)


def test_held_out_metrics_agree_with_scikit_learn_and_scipy():
    g = torch.Generator().manual_seed(0)
    specs = {"topic": HeadSpec("classification", 3), "score": HeadSpec("regression", 1),
             "tags": HeadSpec("token_classification", 4)}
    logits = {"topic": [torch.randn(10, 3, generator=g), torch.randn(7, 3, generator=g)],
              "score": [torch.randn(17, 1, generator=g)], "tags": [torch.randn(5, 6, 4, generator=g)]}
    gold = {"topic": [torch.randint(0, 3, (10,), generator=g), torch.randint(0, 3, (7,), generator=g)],
            "score": [torch.randn(17, generator=g)], "tags": [torch.randint(0, 4, (5, 6), generator=g)]}
    gold["tags"][0][:, 4:] = IGNORE
    got = tasks.metrics(specs, logits, gold)
    pred, true = torch.cat(logits["topic"]).argmax(-1), torch.cat(gold["topic"])
    assert got["finetune/topic/accuracy"] == pytest.approx((pred == true).float().mean().item())
    assert got["finetune/topic/macro_f1"] == pytest.approx(f1_score(true, pred, average="macro"))
    x, y = torch.cat(logits["score"]).squeeze(-1).double(), torch.cat(gold["score"]).double()
    assert got["finetune/score/mse"] == pytest.approx(((x - y) ** 2).mean().item())
    assert got["finetune/score/pearson"] == pytest.approx(pearsonr(x, y).statistic)
    keep = gold["tags"][0] != IGNORE
    assert got["finetune/tags/token_accuracy"] == pytest.approx(
        (logits["tags"][0].argmax(-1)[keep] == gold["tags"][0][keep]).float().mean().item())
    single = tasks.metrics({"task": specs["topic"]}, {"task": logits["topic"]}, {"task": gold["topic"]})
    assert set(single) == {"finetune/accuracy", "finetune/macro_f1"}


def test_batches_follow_one_global_order_for_any_number_of_workers():
    examples = [tasks.Example((i + 1,) * (1 + i % 5), {"task": i % 2}) for i in range(23)]
    whole = tasks.batch_at(examples, 40, 12, seed=3)
    for world in (1, 2, 3):
        per = 12 // world
        parts = [e for rank in range(world) for e in tasks.batch_at(examples, 40 + rank * per, per, seed=3)]
        assert parts == whole
    epoch = tasks.batch_at(examples, 23, 23, seed=3)
    assert sorted(e.ids for e in epoch) == sorted(e.ids for e in examples)  # every example once per epoch
    idx, labels = tasks.collate(whole[:4], {"task": HeadSpec("classification", 2)}, 50256)
    assert idx.shape == (4, max(len(e.ids) for e in whole[:4])) and labels["task"].dtype == torch.long
    assert all(idx[r, len(e.ids):].eq(50256).all() for r, e in enumerate(whole[:4]))


# --- the stage: DeepSpeed under Ray Train, MLflow lineage, registry, resume -------------------------

def passages(n_per_kind: int, seed: int) -> list[dict]:
    """Two kinds of text from the built-in corpus, a label for which (0: Python's help topics, 1: the standard
    library's docstrings), and a regression target: the passage's length in words (12 to 30), standardised."""
    import random

    from tokenization import builtin

    rng = random.Random(seed)
    kinds: dict[int, list[str]] = {0: [], 1: []}
    for name, text in builtin.documents():
        words = text.split()
        for i in range(0, len(words) - 30, 30):
            kinds[0 if name.startswith("pydoc_data") else 1].append(words[i:i + 30])
    out = []
    for kind, chunks in kinds.items():
        for words in rng.sample(chunks, n_per_kind):
            n = rng.randint(12, 30)
            out.append({"passage": " ".join(words[:n]), "kind": kind, "words": (n - 21) / 9})
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, builtin_dataset):
    """A tiny GPT-2 pretrained for a few steps by the pipeline's train stage code, with its MLflow lineage."""
    from conftest import tiny_config

    from pipeline.core.lineage import Lineage
    from train import launch

    root = tmp_path_factory.mktemp("pretrained")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_config(root, builtin_dataset, "cluster.num_workers=1", "train.max_steps=8", "checkpoint.interval=8",
                      "model.block_size=64")
    track = Lineage(uri, "gpt2-pretraining", cfg.with_absolute_paths().run_dir)
    parent = track.start_parent("pretrained", {}, {})
    result = launch.run(cfg, tracking={"uri": uri, "run_id": track.stage_run("train")})
    return {"checkpoint": result.checkpoint, "uri": uri, "parent": parent, "root": root}


FT = ["finetune.text_fields=passage", "finetune.max_len=32", "finetune.batch_size=16", "finetune.micro_batch_size=8",
      "finetune.lr=3e-3", "finetune.warmup_steps=4", "cluster.num_workers=1", "cluster.cpus_per_worker=1",
      "cluster.max_failures=0", "tracking.system_metrics=false"]


@pytest.mark.slow
def test_multi_task_fine_tune_separates_the_texts_fits_the_lengths_and_lands_in_mlflow(pretrained, tmp_path):
    from conftest import run_cli
    from mlflow.tracking import MlflowClient

    records = passages(150, seed=0)
    write_jsonl(tmp_path / "task.jsonl", records[:240])
    write_jsonl(tmp_path / "held.jsonl", records[240:])
    proc = run_cli("train/finetune.py", "--config", "smoke", "--ckpt", str(pretrained["checkpoint"]), "--task",
                   str(tmp_path / "task.jsonl"),
                   "--eval-task", str(tmp_path / "held.jsonl"), *FT, "finetune.head=multi",
                   "finetune.heads={kind: {head: classification, label_field: kind}, "
                   "length: {head: regression, label_field: words}}",
                   "finetune.max_steps=120", "finetune.checkpoint_interval=60", "finetune.lr=5e-3", f"run.root={tmp_path}",
                   env={"MLFLOW_TRACKING_URI": pretrained["uri"]})
    results = json.loads((tmp_path / "smoke" / "finetune" / "results.json").read_text())
    scores = results["metrics"]
    assert scores["finetune/kind/accuracy"] > 0.7, scores  # chance: 0.5 (60 held-out passages of each kind)
    gold = [r["words"] for r in records[240:]]
    variance = sum((g - sum(gold) / len(gold)) ** 2 for g in gold) / len(gold)
    # fit: predicting the mean scores an MSE of the variance and no correlation (the MSE bound is loose: after
    # 120 steps the head's scale is still settling, and one CPU's float rounding gave 0.83 of the variance)
    assert scores["finetune/length/pearson"] > 0.5 and scores["finetune/length/mse"] < variance, (scores, variance)
    assert "finetune/kind/accuracy" in proc.stdout

    client = MlflowClient(pretrained["uri"])
    run = client.search_runs([client.get_experiment_by_name("gpt2-pretraining").experiment_id],
                             "tags.`gpt2.stage` = 'finetune'")[0]
    assert run.data.tags["mlflow.parentRunId"] == pretrained["parent"]  # beside the train run that made the checkpoint
    assert run.data.metrics["finetune/kind/accuracy"] == pytest.approx(scores["finetune/kind/accuracy"])
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 121))
    version = client.get_model_version_by_alias("gpt2-pipeline-finetuned", "best")
    assert version.run_id == run.info.run_id
    # its model card: where it started, the data, the held-out scores, the code
    for text in ("fine-tuned", "Started from", f"{results['examples']['train']:,} training examples", "finetune/kind/accuracy",
                 f"{scores['finetune/kind/accuracy']:.4f}", run.data.tags["mlflow.source.git.commit"]):
        assert text in version.description, text
    assert run.info.run_id in version.tags["finetune_run"]


def fine_tune_config(root, *overrides: str, task=None, uri: str | None = None):
    values = {"run.root": str(root), "finetune.task": str(task) if task else None, "tracking.uri": uri,
              "tracking.enabled": uri is not None}
    return load_config("smoke", [*FT, "finetune.max_steps=16", "finetune.checkpoint_interval=4",
                                 "finetune.text_fields=passage", "finetune.label_field=kind", *overrides],
                       {k: v for k, v in values.items() if v is not None})


@pytest.fixture(scope="module")
def kind_task(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "kinds.jsonl"
    return write_jsonl(path, passages(40, seed=1))


@pytest.fixture(scope="module")
def uninterrupted_fine_tune(tmp_path_factory, pretrained, kind_task):
    """16 steps of a classification fine-tune, checkpoints every 4, registered as `ft-resume`."""
    from train import finetuning

    cfg = fine_tune_config(tmp_path_factory.mktemp("ft-uninterrupted"), "finetune.registered_model=ft-resume",
                           task=kind_task, uri=pretrained["uri"])
    finetuning.run(cfg.with_absolute_paths(), pretrained["checkpoint"])
    return cfg


@pytest.mark.slow
def test_a_killed_fine_tune_resumes_and_repeats_identical_losses(uninterrupted_fine_tune, pretrained, kind_task, tmp_path):
    from safetensors.torch import load_file

    from pipeline.core.model import checkpoints
    from pipeline.core.tracking import metrics_file, read_jsonl
    from train import finetuning

    cfg = fine_tune_config(tmp_path, "cluster.max_failures=2", task=kind_task)
    metrics = metrics_file(cfg.with_absolute_paths().finetune_dir)
    with killing_a_worker_after(metrics, 7):
        finetuning.run(cfg.with_absolute_paths(), pretrained["checkpoint"])

    def losses(c) -> dict[int, list[float]]:
        out: dict[int, list[float]] = {}
        for r in read_jsonl(metrics_file(c.with_absolute_paths().finetune_dir)):
            if "train/loss" in r:
                out.setdefault(r["step"], []).append(r["train/loss"])
        return out

    expected, got = losses(uninterrupted_fine_tune), losses(cfg)
    assert sorted(got) == list(range(1, 17))
    # one record per step (the redone ones replaced theirs), bitwise: fp32 on CPU, same examples and dropout seeds
    assert all(values == expected[step] for step, values in got.items()), (got, expected)
    weights = [load_file(f"{checkpoints.latest(finetuning.checkpoint_dir(c.with_absolute_paths()))}"
                         f"/model.safetensors") for c in (uninterrupted_fine_tune, cfg)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert "score.weight" in weights[0]  # transformers' GPT2ForSequenceClassification layout


@pytest.mark.slow
def test_a_fine_tune_leaves_a_nan_step_out_exactly_as_a_skipped_one(pretrained, kind_task, tmp_path, monkeypatch):
    import math

    from safetensors.torch import load_file

    from pipeline.core.model import checkpoints
    from pipeline.core.tracking import metrics_file, read_jsonl
    from train import faults, finetuning

    def fine_tune(name: str, *overrides: str) -> tuple[dict[int, dict], dict[str, torch.Tensor]]:
        cfg = fine_tune_config(tmp_path / name, "finetune.max_steps=6", "finetune.checkpoint_interval=6", *overrides,
                               task=kind_task).with_absolute_paths()
        finetuning.run(cfg, pretrained["checkpoint"])
        steps = {r["step"]: r for r in read_jsonl(metrics_file(cfg.finetune_dir))
                 if "train/loss" in r or "train/skipped_step" in r}  # not the evaluation's records
        return steps, load_file(f"{checkpoints.latest(finetuning.checkpoint_dir(cfg))}/model.safetensors")

    skipped, skipped_weights = fine_tune("skip", "finetune.skip_steps=3-3")
    monkeypatch.setenv(faults.ENV, "nan@3")
    bad, bad_weights = fine_tune("nan")
    assert skipped[3]["train/skipped_step"] == 1 and math.isnan(bad[3]["train/loss"]) and bad[3]["train/bad_step"] == 1
    assert {s: r["train/loss"] for s, r in bad.items() if s != 3} == {s: r["train/loss"] for s, r in skipped.items()
                                                                    if s != 3}
    assert all(torch.equal(bad_weights[k], skipped_weights[k]) for k in skipped_weights)


@pytest.mark.slow
def test_heads_that_do_not_match_the_checkpoint_are_refused_and_models_uris_are_read(uninterrupted_fine_tune, pretrained, tmp_path):
    from conftest import run_cli
    from transformers import GPT2ForSequenceClassification

    from pipeline.core.model import checkpoints, heads
    from pipeline.core.model.heads import HeadMismatch
    from train import finetuning, start_model

    done = uninterrupted_fine_tune.with_absolute_paths()
    final = checkpoints.latest(finetuning.checkpoint_dir(done))
    # the fine-tuned checkpoint is transformers' class, with our logits
    ours, theirs = heads.load_hf(final).eval(), GPT2ForSequenceClassification.from_pretrained(final).eval()
    idx, _ = tasks.collate([tasks.Example(tuple(encode(t)), {}) for t in ("The assert statement is a way", "Return it")],
                           {}, 50256)
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0]["task"], theirs(idx).logits, atol=1e-5, rtol=0)
    # resuming it with other heads
    proc = run_cli("train/finetune.py", "--config", "smoke", "--ckpt", str(pretrained["checkpoint"]), "--resume",
                   f"run.root={done.run.root}", f"finetune.task={done.finetune.task}", "finetune.num_labels=3",
                   "finetune.text_fields=passage", "finetune.label_field=kind", "tracking.enabled=false", check=False)
    assert proc.returncode == 2 and "finetune.heads.task: configured classification/3, checkpoint has classification/2" in proc.stderr
    assert "init/config.json" in proc.stderr
    # starting from the registered fine-tuned model, by its registry URI: its head is kept if it fits
    cfg = fine_tune_config(tmp_path, "finetune.head=regression", "finetune.label_field=words", task=done.finetune.task,
                           uri=pretrained["uri"])
    with pytest.raises(HeadMismatch, match=r"config\.json: .*configured regression/1, checkpoint has classification/2"):
        finetuning.run(cfg.with_absolute_paths(), "models:/ft-resume@best")
    source = start_model.write(fine_tune_config(tmp_path / "again", uri=pretrained["uri"]).with_absolute_paths(),
                               "models:/ft-resume@best", str(tmp_path / "init"))
    assert source["registered"] == "ft-resume/1" and source["run_id"]
    again = heads.load_hf(tmp_path / "init").eval()
    with torch.no_grad():
        assert torch.equal(again(idx)[0]["task"], ours(idx)[0]["task"])


@pytest.mark.slow
def test_the_pipeline_runs_the_optional_finetune_stage_under_its_own_run_and_then_skips_it(pretrained, kind_task, tmp_path):
    from conftest import run_cli
    from mlflow.tracking import MlflowClient

    args = ["pipeline/run.py", "--stages", "finetune", *FT, "finetune.max_steps=4", "finetune.checkpoint_interval=4",
            "finetune.label_field=kind", f"finetune.task={kind_task}", f"finetune.checkpoint={pretrained['checkpoint']}",
            f"run.root={tmp_path}", "run.name=with-finetune", f"tracking.uri={pretrained['uri']}"]
    first = run_cli(*args, env={"MLFLOW_TRACKING_URI": ""})
    assert "finetune/accuracy" in first.stdout
    second = run_cli(*args, env={"MLFLOW_TRACKING_URI": ""})
    assert "finetune: complete" in second.stdout and "skipped" in second.stdout
    client = MlflowClient(pretrained["uri"])
    experiment = client.get_experiment_by_name("gpt2-pretraining").experiment_id
    parent = client.search_runs([experiment], f"tags.`gpt2.run_dir` = '{tmp_path / 'with-finetune'}' and "
                                              f"tags.`gpt2.stage` = 'pipeline'")[0]
    child = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert [r.data.tags["gpt2.stage"] for r in child] == ["finetune"]
    assert "finetune/accuracy" in child[0].data.metrics and "summary/finetune/accuracy" in parent.data.metrics
