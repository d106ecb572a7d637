"""Task heads on the pretrained GPT-2 trunk, and their Hugging Face layout.

The trunk is pipeline/core/model/gpt2.py's GPT without its LM head (`GPT.hidden_states`). A head reads its output:

- `classification`: Hugging Face's GPT2ForSequenceClassification head. GPT-2 is causal, so the state that
  has seen the whole text is the last one: pool at the rightmost token that is not `pad_token_id`, then
  `score` (Linear, no bias) to num_labels logits; cross-entropy.
- `regression`: the same pooling and `score` with one output; MSE (HF's problem_type "regression").
- `token_classification`: GPT2ForTokenClassification's head: dropout, then `classifier` (Linear with
  bias) on every token; cross-entropy over the tokens whose label is not IGNORE (padding, sub-words).

`TaskModel` holds the trunk and one or more named heads; its loss is the weighted sum of the heads'
losses (multi-task). With one classification or token-classification head it saves in Hugging Face's
layout (config.json + model.safetensors that `transformers` opens as the matching class) and reads
theirs; several heads save as GPT2Model's trunk plus `heads.<name>.*` tensors, described in config.json.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.core.command import UserError
from pipeline.core.model.gpt2 import (
    GPT,
    GPTConfig,
    config_from_hf,
    from_hf_state_dict,
    from_state_dict,
    hf_config,
    to_hf_state_dict,
)

KINDS = ("classification", "regression", "token_classification")
IGNORE = -100  # token label that adds no loss (HF's ignore index)
_HF_CLASS = {"classification": "GPT2ForSequenceClassification", "regression": "GPT2ForSequenceClassification",
             "token_classification": "GPT2ForTokenClassification"}
_HF_ATTR = {"classification": "score", "regression": "score", "token_classification": "classifier"}


class HeadMismatch(UserError, ValueError):
    """Heads that do not fit a checkpoint's; the message names the key and the file."""


@dataclass(frozen=True)
class HeadSpec:
    kind: str  # one of KINDS
    num_labels: int  # outputs: classes, or 1 for regression
    weight: float = 1.0  # factor of this head's loss in the multi-task sum
    dropout: float = 0.1  # before a token-classification head (HF's classifier_dropout default)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown head {self.kind!r}; heads: {', '.join(KINDS)}")
        if self.kind == "regression" and self.num_labels != 1:
            raise ValueError(f"a regression head has 1 output, not num_labels={self.num_labels}")
        if self.num_labels < 1 or (self.kind != "regression" and self.num_labels < 2):
            raise ValueError(f"a {self.kind} head needs num_labels >= 2, got {self.num_labels}")


def last_token(idx: torch.Tensor, pad_token_id: int | None) -> torch.Tensor:
    """(B,) index of the rightmost token that is not padding, exactly as GPT2ForSequenceClassification
    picks it (left or right padding; a row of padding only gives 0); the last position without a pad id."""
    if pad_token_id is None:
        return torch.full((idx.size(0),), idx.size(1) - 1, device=idx.device)
    positions = torch.arange(idx.size(1), device=idx.device)
    return (positions * (idx != pad_token_id)).argmax(-1)


class SequenceHead(nn.Module):
    """classification and regression: one vector per sequence, at its last non-padding token."""

    def __init__(self, spec: HeadSpec, n_embd: int):
        super().__init__()
        self.spec = spec
        self.score = nn.Linear(n_embd, spec.num_labels, bias=False)

    def forward(self, hidden: torch.Tensor, idx: torch.Tensor, pad_token_id: int | None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        pooled = hidden[torch.arange(hidden.size(0), device=hidden.device), last_token(idx, pad_token_id)]  # (B, C)
        logits = self.score(pooled)  # (B, K)
        if labels is None:
            return logits, None
        if self.spec.kind == "regression":
            return logits, F.mse_loss(logits.float().squeeze(-1), labels.float())
        return logits, F.cross_entropy(logits.float(), labels)


class TokenHead(nn.Module):
    """token_classification: one label per token."""

    def __init__(self, spec: HeadSpec, n_embd: int):
        super().__init__()
        self.spec = spec
        self.dropout = nn.Dropout(spec.dropout)
        self.classifier = nn.Linear(n_embd, spec.num_labels)

    def forward(self, hidden: torch.Tensor, idx: torch.Tensor, pad_token_id: int | None,
                labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.classifier(self.dropout(hidden))  # (B, T, K)
        if labels is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def make_head(spec: HeadSpec, n_embd: int) -> nn.Module:
    head = TokenHead(spec, n_embd) if spec.kind == "token_classification" else SequenceHead(spec, n_embd)
    for module in head.modules():  # as GPT-2 (and HF) initialise a new linear layer
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return head


class TaskModel(nn.Module):
    """The trunk and named heads. forward(idx, labels={name: tensor}) -> ({name: logits}, weighted loss)."""

    def __init__(self, trunk: GPT, specs: dict[str, HeadSpec], pad_token_id: int | None = 50256):
        super().__init__()
        if not specs:
            raise ValueError("a task model needs at least one head")
        self.trunk, self.specs, self.pad_token_id = trunk, dict(specs), pad_token_id
        self.heads = nn.ModuleDict({name: make_head(spec, trunk.config.n_embd) for name, spec in specs.items()})

    @property
    def config(self) -> GPTConfig:
        return self.trunk.config

    def forward(self, idx: torch.Tensor, labels: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        hidden = self.trunk.hidden_states(idx)  # (B, T, C)
        logits, loss = {}, None
        for name, head in self.heads.items():
            logits[name], part = head(hidden, idx, self.pad_token_id, None if labels is None else labels[name])
            if part is not None:
                part = self.specs[name].weight * part
                loss = part if loss is None else loss + part
        return logits, loss

    # --- Hugging Face layout ---------------------------------------------------------------------
    def hf_files(self, state: dict[str, torch.Tensor] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, config.json) of this model, from `state` (a consolidated state dict of it) or its own."""
        state = self.state_dict() if state is None else state
        trunk = {k.removeprefix("trunk."): v for k, v in state.items() if k.startswith("trunk.")}
        trunk.setdefault("lm_head.weight", trunk["transformer.wte.weight"])  # tied; a gathered state may lack it
        tensors = to_hf_state_dict(trunk, self.config)
        config = {**hf_config(self.config), "pad_token_id": self.pad_token_id,
                  "task_heads": {name: asdict(spec) for name, spec in self.specs.items()}}
        heads = {k.removeprefix("heads."): v.detach().contiguous() for k, v in state.items() if k.startswith("heads.")}
        if len(self.specs) == 1:  # the layout of the matching transformers class
            (name, spec), = self.specs.items()
            tensors.update({k.removeprefix(f"{name}."): v for k, v in heads.items()})
            config.update(architectures=[_HF_CLASS[spec.kind]], num_labels=spec.num_labels,
                          id2label={str(i): f"LABEL_{i}" for i in range(spec.num_labels)},
                          label2id={f"LABEL_{i}": i for i in range(spec.num_labels)})
            if spec.kind == "token_classification":
                config["classifier_dropout"] = spec.dropout
            else:
                config["problem_type"] = "regression" if spec.kind == "regression" else "single_label_classification"
        else:  # no transformers class holds several heads: GPT2Model opens the trunk
            tensors.update({f"heads.{k}": v for k, v in heads.items()})
            config["architectures"] = ["GPT2Model"]
        return tensors, config

    def save_hf(self, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """config.json + model.safetensors; `state`: a consolidated state dict to write instead of the
        model's own (as gpt2.save_hf)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors, config = self.hf_files(state)
        save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def specs_from_hf(config: dict) -> dict[str, HeadSpec]:
    """The heads a config.json describes: ours (`task_heads`) or a transformers class's; {} for none."""
    if config.get("task_heads"):
        return {name: HeadSpec(**spec) for name, spec in config["task_heads"].items()}
    arch = (config.get("architectures") or [""])[0]
    if arch == "GPT2ForSequenceClassification":
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        kind = "regression" if config.get("problem_type") == "regression" or labels == 1 else "classification"
        return {"task": HeadSpec(kind, labels)}
    if arch == "GPT2ForTokenClassification":
        labels = config.get("num_labels") or len(config.get("id2label") or {}) or 2
        dropout = config.get("classifier_dropout")
        return {"task": HeadSpec("token_classification", labels, dropout=0.1 if dropout is None else dropout)}
    return {}


def from_hf(config: dict, tensors: dict[str, torch.Tensor], where: str = "model.safetensors",
            pad_vocab_to: int = 64) -> TaskModel:
    """A TaskModel from a config.json and its tensors (ours, or a transformers checkpoint with a head)."""
    specs = specs_from_hf(config)
    if not specs:
        raise HeadMismatch(f"{where}: config.json describes no task head (architectures: {config.get('architectures')})")
    gpt_config = config_from_hf(config, pad_vocab_to)
    head_state, trunk = {}, {}
    for name, tensor in tensors.items():
        if name.startswith(("score.", "classifier.")):  # a transformers class's one head
            head_state[f"{next(iter(specs))}.{name}"] = tensor
        elif name.startswith("heads."):
            head_state[name.removeprefix("heads.")] = tensor
        else:
            trunk[name] = tensor
    model = TaskModel(from_state_dict(gpt_config, from_hf_state_dict(trunk, gpt_config), where), specs,
                      config.get("pad_token_id"))
    expected = model.heads.state_dict()
    problems = sorted(set(expected) ^ set(head_state)) + [
        f"{k}: found {tuple(head_state[k].shape)}, expected {tuple(v.shape)}"
        for k, v in expected.items() if k in head_state and head_state[k].shape != v.shape]
    if problems:
        raise HeadMismatch(f"{where}: tensors do not fit the heads config.json describes "
                           f"({', '.join(f'{n}: {s.kind}/{s.num_labels}' for n, s in specs.items())}): {', '.join(problems[:5])}")
    model.heads.load_state_dict({k: v.float() for k, v in head_state.items()})
    return model


def load_hf(directory: str | Path, pad_vocab_to: int = 64) -> TaskModel:
    """A TaskModel from a directory of config.json + model.safetensors with its heads."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    return from_hf(config, load_file(str(directory / "model.safetensors")), str(directory / "model.safetensors"),
                   pad_vocab_to)


def check_heads(wanted: dict[str, HeadSpec], found: dict[str, HeadSpec], where: str, key: str = "finetune") -> None:
    """Refuse to continue a checkpoint whose heads differ from the configured ones, naming what differs."""
    if set(wanted) != set(found) and len(wanted) == len(found) == 1:
        found = dict(zip(wanted, found.values()))  # one head: its name does not matter
    diffs = [f"{key}.heads.{n}: configured {'none' if n not in wanted else f'{wanted[n].kind}/{wanted[n].num_labels}'}, "
             f"checkpoint has {'none' if n not in found else f'{found[n].kind}/{found[n].num_labels}'}"
             for n in sorted(set(wanted) | set(found))
             if n not in wanted or n not in found or (wanted[n].kind, wanted[n].num_labels) != (found[n].kind, found[n].num_labels)]
    if diffs:
        raise HeadMismatch(f"{where}: the checkpoint's heads do not match the configured ones: {'; '.join(diffs)} "
                           f"(use a matching finetune.head / finetune.num_labels, or start from a trunk)")
