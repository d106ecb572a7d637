"""Task heads against Hugging Face's GPT2ForSequenceClassification / GPT2ForTokenClassification on the same
weights, both ways through the Hugging Face layout, and the multi-task loss."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2ForTokenClassification, GPT2Model

from pipeline.core.model import heads
from pipeline.core.model.gpt2 import GPT, GPTConfig
from pipeline.core.model.heads import IGNORE, HeadMismatch, HeadSpec, TaskModel

TINY = GPTConfig(n_layer=2, n_head=4, n_embd=64, block_size=48)
PAD = 50256


def padded_batch(seed: int, lengths=(40, 17, 1, 29)) -> torch.Tensor:
    """Right-padded rows of real tokens (never the pad id), as the fine-tune loader builds them."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.full((len(lengths), max(lengths)), PAD)
    for row, n in enumerate(lengths):
        idx[row, :n] = torch.randint(0, PAD, (n,), generator=g)
    return idx


def task_model(seed: int, **specs: HeadSpec) -> TaskModel:
    torch.manual_seed(seed)
    model = TaskModel(GPT(TINY), specs, PAD)
    for p in model.heads.parameters():  # non-zero biases too, so a dropped bias would show
        torch.nn.init.normal_(p, std=0.5)
    return model.eval()


@pytest.mark.parametrize("kind,labels", [("classification", 3), ("regression", 1)])
def test_sequence_heads_give_transformers_logits_and_loss_through_its_layout(kind, labels, tmp_path):
    ours = task_model(0, task=HeadSpec(kind, labels))
    ours.save_hf(tmp_path)
    theirs = GPT2ForSequenceClassification.from_pretrained(tmp_path).eval()
    assert theirs.config.pad_token_id == PAD and theirs.config.num_labels == labels
    idx = padded_batch(1)
    target = torch.tensor([0, 2, 1, 2]) if kind == "classification" else torch.tensor([0.5, -1.0, 2.0, 0.0])
    with torch.no_grad():
        logits, loss = ours(idx, {"task": target})
        out = theirs(idx, labels=target)
    assert logits["task"].shape == out.logits.shape == (4, labels)
    assert torch.allclose(logits["task"], out.logits, atol=1e-5, rtol=0)
    assert abs(loss.item() - out.loss.item()) < 1e-5
    # pooling reads the last real token: the other rows are untouched, row 1 now pools elsewhere
    with torch.no_grad():
        other = idx.clone()
        other[1, 30] = 7  # row 1 ends at position 16; a real token at 30 makes that its last one
        assert not torch.allclose(ours(other)[0]["task"][1], logits["task"][1])
        assert torch.allclose(ours(other)[0]["task"][[0, 2, 3]], logits["task"][[0, 2, 3]], atol=1e-6)


def test_token_head_gives_transformers_logits_and_loss_through_its_layout(tmp_path):
    ours = task_model(2, task=HeadSpec("token_classification", 5))
    ours.save_hf(tmp_path)
    theirs = GPT2ForTokenClassification.from_pretrained(tmp_path).eval()
    idx = padded_batch(3)
    labels = torch.randint(0, 5, idx.shape, generator=torch.Generator().manual_seed(4))
    labels[idx == PAD] = IGNORE
    with torch.no_grad():
        logits, loss = ours(idx, {"task": labels})
        out = theirs(idx, labels=labels)
    assert logits["task"].shape == out.logits.shape == (4, 40, 5)
    assert torch.allclose(logits["task"], out.logits, atol=1e-5, rtol=0)
    assert abs(loss.item() - out.loss.item()) < 1e-5


@pytest.mark.parametrize("hf_class,num_labels", [(GPT2ForSequenceClassification, 4), (GPT2ForTokenClassification, 3)])
def test_our_loader_reads_a_transformers_checkpoint_with_a_head(hf_class, num_labels, tmp_path):
    torch.manual_seed(5)
    config = GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, num_labels=num_labels, pad_token_id=PAD)
    theirs = hf_class(config).eval()
    theirs.save_pretrained(tmp_path)
    ours = heads.load_hf(tmp_path).eval()
    kind = "classification" if hf_class is GPT2ForSequenceClassification else "token_classification"
    assert ours.specs == {"task": HeadSpec(kind, num_labels)} and ours.pad_token_id == PAD
    idx = padded_batch(6, lengths=(32, 9, 20))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0]["task"], theirs(idx).logits, atol=1e-5, rtol=0)
    ours.save_hf(tmp_path / "again")  # and writes back the tensors it read
    before, after = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert set(before) - {"lm_head.weight"} == set(after)  # transformers may or may not store the tied head
    assert all(torch.equal(after[k], before[k]) for k in after)


def test_multi_task_loss_is_the_weighted_sum_of_each_heads_loss_and_the_layout_round_trips(tmp_path):
    specs = {"topic": HeadSpec("classification", 3, weight=0.5), "score": HeadSpec("regression", 1, weight=2.0),
             "tags": HeadSpec("token_classification", 4, weight=1.0)}
    ours = task_model(7, **specs)
    idx = padded_batch(8)
    labels = {"topic": torch.tensor([2, 0, 1, 1]), "score": torch.tensor([0.1, 0.2, -0.3, 1.5]),
              "tags": torch.randint(0, 4, idx.shape, generator=torch.Generator().manual_seed(9))}
    with torch.no_grad():
        logits, loss = ours(idx, labels)
        expected = 0.0
        for name, spec in specs.items():  # each head alone, as transformers' class for it computes its loss
            single = TaskModel(ours.trunk, {name: spec}, PAD).eval()
            single.heads[name].load_state_dict(ours.heads[name].state_dict())
            single.save_hf(tmp_path / name)
            hf = (GPT2ForTokenClassification if spec.kind == "token_classification" else
                  GPT2ForSequenceClassification).from_pretrained(tmp_path / name).eval()
            out = hf(idx, labels=labels[name])
            assert torch.allclose(logits[name], out.logits, atol=1e-5, rtol=0)
            expected += spec.weight * out.loss.item()
    assert abs(loss.item() - expected) < 1e-5

    ours.save_hf(tmp_path / "multi")
    config = json.loads((tmp_path / "multi" / "config.json").read_text())
    assert config["architectures"] == ["GPT2Model"] and set(config["task_heads"]) == set(specs)
    again = heads.load_hf(tmp_path / "multi").eval()
    assert again.specs == specs
    with torch.no_grad():
        for name, value in again(idx)[0].items():
            assert torch.equal(value, logits[name])
        trunk = GPT2Model.from_pretrained(tmp_path / "multi").eval()  # transformers opens the trunk
        assert torch.allclose(trunk(idx).last_hidden_state, ours.trunk.hidden_states(idx), atol=1e-5, rtol=0)


def test_heads_that_do_not_fit_are_refused_naming_the_key_and_file(tmp_path):
    ours = task_model(10, task=HeadSpec("classification", 3))
    ours.save_hf(tmp_path)
    found = heads.specs_from_hf(json.loads((tmp_path / "config.json").read_text()))
    heads.check_heads({"sentiment": HeadSpec("classification", 3)}, found, str(tmp_path))  # one head: any name
    with pytest.raises(HeadMismatch, match=r"finetune\.heads\.task: configured classification/2, checkpoint has classification/3"):
        heads.check_heads({"task": HeadSpec("classification", 2)}, found, str(tmp_path))
    with pytest.raises(HeadMismatch, match=str(tmp_path)):
        heads.check_heads({"task": HeadSpec("regression", 1)}, found, str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    config["task_heads"]["task"]["num_labels"] = 5  # a config.json that lies about its tensors
    with pytest.raises(HeadMismatch, match=r"model\.safetensors.*task\.score\.weight: found \(3, 64\), expected \(5, 64\)"):
        heads.from_hf(config, load_file(tmp_path / "model.safetensors"), str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="regression head has 1 output"):
        HeadSpec("regression", 2)
    with pytest.raises(ValueError, match="unknown head"):
        HeadSpec("ranking", 2)
