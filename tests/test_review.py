"""What a user reviews a run by, without running one: the hand-written smoke items, the published references and
where they apply, the training figure, the model card and its reproduce command. (The whole record in MLflow, and
in a browser, is checked after a real run in tests/test_pipeline.py.)"""

from __future__ import annotations

import shlex

import pytest

from eval import figures, hellaswag, references
from eval.val_loss import VAL_LOSS
from pipeline import model_card
from pipeline.core.config import load_config
from pipeline.core.lineage import dataset_entity, source_tags

PNG = b"\x89PNG\r\n\x1a\n"


def test_in_the_smoke_items_the_right_ending_is_the_shortest_as_often_as_chance():
    items, info = hellaswag.load("smoke")
    shortest = 0
    for item in items:
        lengths = [len(c) for c in hellaswag.harness_texts(item)[1]]  # acc_norm divides by these
        shortest += lengths.index(min(lengths)) == item.label and lengths.count(min(lengths)) == 1
    assert len(items) == 16 and shortest == 4  # 1 in 4
    assert not info["official_validation_set"]
    assert "not HellaSwag" in references.hellaswag_label("smoke")


def test_published_references_apply_only_where_the_same_thing_was_measured():
    assert references.applicable(load_config("gpt2-124m")) == {
        VAL_LOSS: 3.2924, hellaswag.ACC: 0.2945, hellaswag.ACC_NORM: 0.3114}
    assert references.applicable(load_config("smoke")) == {}  # built-in corpus, hand-written items
    # a subset of HellaSwag is not the set the figures were measured on; other data is not FineWeb-Edu
    assert references.applicable(load_config("gpt2-124m", ["eval.hellaswag_limit=100"])) == {VAL_LOSS: 3.2924}
    assert VAL_LOSS not in references.applicable(load_config("gpt2-124m", ["data.input=builtin"]))


def test_the_figure_draws_loss_and_hellaswag_against_tokens_with_the_references():
    records = [{"tokens": 100 * s, "train/loss": 10 - s} for s in range(1, 5)]
    records += [{"tokens": 400, VAL_LOSS: 6.5, hellaswag.ACC: 0.26, hellaswag.ACC_NORM: 0.3}]
    fig = figures.draw(records, {VAL_LOSS: 3.2924, hellaswag.ACC_NORM: 0.3114}, "run", "HellaSwag validation set")
    loss, swag = fig.axes
    lines = {line.get_label(): line for line in loss.lines}
    assert list(lines["train loss"].get_xdata()) == [100, 200, 300, 400]
    assert list(lines["train loss"].get_ydata()) == [9, 8, 7, 6]
    assert list(lines["val loss"].get_ydata()) == [6.5]
    assert list(lines["GPT-2 124M (OpenAI) val loss 3.2924"].get_ydata()) == [3.2924, 3.2924]
    labels = {line.get_label() for line in swag.lines}
    assert {"acc [harness]", "acc_norm [harness]", "GPT-2 124M (OpenAI) acc_norm [harness] 0.3114",
            "chance (1 in 4)"} <= labels
    assert not any("acc [harness] 0.2945" in label for label in labels)  # only the references given are drawn
    assert swag.get_title() == "HellaSwag validation set" and loss.get_xlabel() == "tokens"
    assert figures.png(fig)[:8] == PNG
    # without references: no dashed line
    plain = figures.draw(records, {}, "run", "smoke")
    assert not any("GPT-2" in line.get_label() for ax in plain.axes for line in ax.lines)


def _card(preset: str, hellaswag_source: str) -> str:
    cfg = load_config(preset, [f"eval.hellaswag={hellaswag_source}", "run.root=/runs"]).with_absolute_paths()
    manifest = {"source": {"kind": "hf", "repo": "HuggingFaceFW/fineweb-edu"},
                "totals": {"train": {"tokens": 9_000, "documents": 90, "shards": 2},
                           "val": {"tokens": 1_000, "documents": 10, "shards": 1}}}
    scores = {VAL_LOSS: 3.5, hellaswag.ACC: 0.28, hellaswag.ACC_NORM: 0.29, hellaswag.COMPLETION_ACC: 0.27,
              hellaswag.COMPLETION_ACC_NORM: 0.3}
    return model_card.pretrained(cfg, name="gpt2-pipeline", version="7", manifest=manifest, manifest_sha256="ab" * 32,
                                 manifest_link="#/m", trained={"step": 10, "tokens": 5_242_880}, scores=scores,
                                 commit="0123abc", links={"train run": "#/t", "pipeline run": "#/p"},
                                 tracking_uri="http://user:secret@mlflow:5000")


def test_the_model_card_puts_the_scores_beside_the_published_ones_where_they_compare():
    card = _card("gpt2-124m", "official")
    for text in ("`hf:HuggingFaceFW/fineweb-edu`", "9,000 tokens in 90 documents (2 shards)", "ab" * 32,
                 "n_layer=12, n_head=12, n_embd=768", "10 steps, 5,242,880 tokens", "| val loss | 3.5000 | 3.2924 |",
                 "| HellaSwag acc_norm [harness] | 0.2900 | 0.3114 |", "| HellaSwag acc [completion: build-nanogpt style] "
                 "| 0.2700 | not published |", "git commit `0123abc`", "[train run](#/t)", "[pipeline run](#/p)"):
        assert text in card, text
    assert "not comparable" not in card and "secret" not in card
    command = shlex.split(card.split("```\n")[1].split("\n```")[0])
    assert command[0] == "MLFLOW_TRACKING_URI=http://***@mlflow:5000"  # credentials never in a description
    assert command[1:5] == ["python", "eval/run.py", "--ckpt", "models:/gpt2-pipeline/7"]
    assert command[command.index("--hellaswag") + 1] == "official" and "batch.seq_len=1024" in command


def test_the_model_card_of_a_smoke_run_never_calls_its_items_hellaswag():
    card = _card("smoke", "smoke")
    assert "| smoke items acc_norm [harness] | 0.2900 | 0.3114 on HellaSwag's validation set, not comparable" in card
    assert "HellaSwag acc" not in card and "hand-written smoke items" in card
    assert "3.2924 on FineWeb-Edu val, not comparable" in card  # smoke's data is the built-in corpus


def test_datasets_and_source_tags_as_mlflow_records_them():
    entity = dataset_entity({"name": "builtin/train", "digest": "f" * 64, "source": "s3://bucket/data/manifest.json",
                             "context": "training", "profile": {"tokens": 5}})
    assert entity.digest == "f" * 36 and entity.source_type == "s3" and '"tokens": 5' in entity.profile
    tags = source_tags()
    assert set(tags) == {"mlflow.source.git.commit", "mlflow.source.name", "mlflow.source.type", "mlflow.user"}
    assert all(tags.values())


@pytest.mark.parametrize("source,expected", [("official", "HellaSwag validation set"),
                                             ("/data/x.jsonl", "HellaSwag-format items (x.jsonl)")])
def test_hellaswag_data_is_named_for_what_it_is(source, expected):
    assert references.hellaswag_label(source) == expected
