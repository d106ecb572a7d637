"""Task data for fine-tuning: labelled records -> token ids and labels, batches, held-out metrics.

A task is JSONL (plain or gzip) or Parquet files (a file, directory or glob, local or any fsspec URL), or
a Hugging Face dataset (`hf:OWNER/NAME` or a local dataset directory, with finetune.hf_config and the
train/eval splits), resolved to files by tokenization/sources.py as for pretraining. The input of a
record is its text field(s) (several, a pair, joined by newlines), encoded with GPT-2's tokenizer and
cut at finetune.max_len tokens (counted); for token classification the text field is a list of words and
the label field a list with one label per word, given to the word's first token (the others, IGNORE).

Every bad record stops the job with its file and line (or Parquet row) and the key: a missing field, a
label outside finetune.num_labels, a word/label count that differs; so does an empty split. Nothing is
dropped silently.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.core import storage
from pipeline.core.command import UserError
from pipeline.core.config import DataConfig, FinetuneConfig
from pipeline.core.model.heads import IGNORE, HeadSpec
from tokenization import sources


class TaskError(UserError, ValueError):
    """Task data that cannot be used; the message names the file and line (or row) and the key."""


@dataclass(frozen=True)
class Example:
    ids: tuple[int, ...]
    labels: dict  # head name -> int class, float target, or tuple of per-token labels


@dataclass(frozen=True)
class Split:
    examples: list[Example]
    truncated: int  # examples cut at finetune.max_len
    source: str  # where they came from, for messages


def head_specs(f: FinetuneConfig) -> dict[str, HeadSpec]:
    """The heads the config asks for: one named "task", or the named heads of head=multi."""
    if f.head != "multi":
        return {"task": HeadSpec(f.head, 1 if f.head == "regression" else f.num_labels, dropout=f.classifier_dropout)}
    return {name: HeadSpec(h.head, 1 if h.head == "regression" else h.num_labels, h.weight, f.classifier_dropout)
            for name, h in f.heads.items()}


def label_fields(f: FinetuneConfig) -> dict[str, str]:
    return {"task": f.label_field} if f.head != "multi" else {name: h.label_field for name, h in f.heads.items()}


def load(f: FinetuneConfig, which: str, encode) -> Split:
    """The "train" or "eval" split as examples. Without finetune.eval_task, files are split by a hash of
    each record's input (eval_fraction held out), a hf: dataset by its named splits."""
    if not f.task:
        raise TaskError("finetune.task: no task data given (a JSONL/Parquet path or hf:NAME)")
    hub = f.task.startswith("hf:")
    if which == "eval" and f.eval_task:
        spec, split, keep, key = f.eval_task, f.eval_split, None, "finetune.eval_task"
    elif hub:
        spec, split, keep, key = f.task, f.train_split if which == "train" else f.eval_split, None, "finetune.task"
    else:
        spec, split, keep, key = f.task, None, which, "finetune.task"
    specs, fields = head_specs(f), label_fields(f)
    words = any(s.kind == "token_classification" for s in specs.values())
    examples, truncated = [], 0
    for where, record in _records(spec, split, f, key, f"finetune.{which}_split"):
        text = _input(record, f.text_fields, words, where)
        if keep is not None and (_held_out(text, f.eval_fraction) != (keep == "eval")):
            continue
        ids, starts = _encode(text, encode)
        labels = {name: _label(record, fields[name], spec, where, len(starts)) for name, spec in specs.items()}
        if len(ids) > f.max_len:
            truncated += 1
            ids = ids[:f.max_len]
        labels = {name: _per_token(v, starts, len(ids)) if specs[name].kind == "token_classification" else v
                  for name, v in labels.items()}
        examples.append(Example(tuple(ids), labels))
    described = f"{spec}" + (f" (split {split!r})" if split else f" ({which} part, finetune.eval_fraction={f.eval_fraction})")
    if not examples:
        raise TaskError(f"{described}: the {which} split is empty")
    return Split(examples, truncated, described)


def fingerprint(*splits: Split) -> str:
    """sha256 of the examples: a resumed fine-tune must see the same data."""
    digest = hashlib.sha256()
    for split in splits:
        for e in split.examples:
            digest.update(json.dumps([e.ids, sorted(e.labels.items())]).encode())
    return digest.hexdigest()


def source_fingerprint(f: FinetuneConfig) -> str:
    """Changes whenever a task file does (its size and modification time or ETag): the pipeline's
    finetune stage is redone, not skipped, when its data changed."""
    held_spec, held_key = (f.eval_task, "finetune.eval_task") if f.eval_task else (f.task, "finetune.task")
    parts = [_source(f.task, f.train_split, f, "finetune.task", "finetune.train_split").fingerprint,
             _source(held_spec, f.eval_split, f, held_key, "finetune.eval_split").fingerprint]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def _source(spec: str, split: str | None, f: FinetuneConfig, key: str, split_key: str) -> sources.Source:
    data = DataConfig(input=[spec], format=f.format, hf_config=f.hf_config, hf_revision=f.hf_revision,
                      hf_split=split or "train")
    try:
        return sources.resolve(data)
    except sources.CorpusError as err:  # sources names tokenization's keys; say which of ours
        message = str(err).replace("data.input", key).replace("data.hf_split", split_key)
        raise TaskError(message.replace("data.", "finetune.")) from None


def _records(spec: str, split: str | None, f: FinetuneConfig, key: str, split_key: str) -> Iterator[tuple[str, dict]]:
    for file in _source(spec, split, f, key, split_key).files:
        if file.format == "jsonl":
            raw = storage.read_bytes(file.url)
            if file.compressed:
                raw = gzip.decompress(raw)
            for number, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise TaskError(f"{file.url}:{number}: malformed JSON ({err.msg})") from None
                if not isinstance(record, dict):
                    raise TaskError(f"{file.url}:{number}: a record must be a JSON object")
                yield f"{file.url}:{number}", record
        elif file.format == "parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(io.BytesIO(storage.read_bytes(file.url)))
            for row, record in enumerate(table.to_pylist()):
                yield f"{file.url}: row {row}", record
        else:
            raise TaskError(f"{file.url}: {file.format} files hold no labels; task data is JSONL or Parquet")


def _input(record: dict, text_fields: list[str], words: bool, where: str) -> str | list[str]:
    values = []
    for field in text_fields:
        if field not in record:
            raise TaskError(f"{where}: no text field '{field}' (finetune.text_fields); fields: {', '.join(record)}")
        values.append(record[field])
    if words:
        if len(values) != 1 or not isinstance(values[0], list) or not values[0] or \
                not all(isinstance(w, str) and w for w in values[0]):
            raise TaskError(f"{where}: token classification takes one text field holding a non-empty list of "
                            f"words (finetune.text_fields={text_fields})")
        return values[0]
    for field, value in zip(text_fields, values):
        if not isinstance(value, str) or not value.strip():
            raise TaskError(f"{where}: text field '{field}' must be a non-empty string, got {value!r:.60}")
    return "\n".join(values)


def _encode(text: str | list[str], encode) -> tuple[list[int], list[int]]:
    """Token ids, and where each word starts (for a word list: words after the first get GPT-2's leading space)."""
    if isinstance(text, str):
        return encode(text), []
    ids, starts = [], []
    for i, word in enumerate(text):
        starts.append(len(ids))
        ids += encode(word if i == 0 else " " + word)
    return ids, starts


def _label(record: dict, field: str, spec: HeadSpec, where: str, words: int):
    if field not in record:
        raise TaskError(f"{where}: no label field '{field}'; fields: {', '.join(record)}")
    value = record[field]
    key = f"label field '{field}'"
    if spec.kind == "regression":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise TaskError(f"{where}: {key} must be a finite number for regression, got {value!r}")
        return float(value)
    values = value if spec.kind == "token_classification" else [value]
    if spec.kind == "token_classification" and (not isinstance(value, list) or len(value) != words):
        raise TaskError(f"{where}: {key} must list one label per word ({words} words), got {value!r:.80}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < spec.num_labels:
            raise TaskError(f"{where}: {key} value {v!r} is outside 0..{spec.num_labels - 1} "
                            f"(num_labels={spec.num_labels})")
    return tuple(values) if spec.kind == "token_classification" else values[0]


def _per_token(word_labels: tuple[int, ...], starts: list[int], length: int) -> tuple[int, ...]:
    out = [IGNORE] * length
    for label, start in zip(word_labels, starts):
        if start < length:
            out[start] = label
    return tuple(out)


def _held_out(text: str | list[str], fraction: float) -> bool:
    """Held out by content, so the split depends on no file order (as tokenization's validation split)."""
    digest = hashlib.blake2b(json.dumps(text).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


# --- batches ---------------------------------------------------------------------------------------

def order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


def batch_at(examples: list[Example], first: int, count: int, seed: int) -> list[Example]:
    """Global examples [first, first + count) of the endless shuffled stream (a new order each epoch):
    the position is one number, so a resume with any number of workers continues exactly."""
    n = len(examples)
    return [examples[int(order(n, seed, k // n)[k % n])] for k in range(first, first + count)]


def collate(batch: list[Example], specs: dict[str, HeadSpec], pad_token_id: int) -> tuple[torch.Tensor, dict]:
    """Right-padded ids (B, T) with T the longest example, and labels per head."""
    width = max(len(e.ids) for e in batch)
    idx = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    for row, e in enumerate(batch):
        idx[row, :len(e.ids)] = torch.tensor(e.ids)
    labels = {}
    for name, spec in specs.items():
        if spec.kind == "token_classification":
            t = torch.full((len(batch), width), IGNORE, dtype=torch.long)
            for row, e in enumerate(batch):
                t[row, :len(e.labels[name])] = torch.tensor(e.labels[name])
            labels[name] = t
        else:
            labels[name] = torch.tensor([e.labels[name] for e in batch],
                                        dtype=torch.float32 if spec.kind == "regression" else torch.long)
    return idx, labels


# --- metrics ---------------------------------------------------------------------------------------

PRIMARY = {"classification": "accuracy", "regression": "pearson", "token_classification": "token_accuracy"}


def primary_metric(specs: dict[str, HeadSpec], prefix: str = "finetune/") -> str:
    """The score that ranks fine-tuned models (higher is better): the first head's."""
    name, spec = next(iter(specs.items()))
    return f"{prefix}{'' if len(specs) == 1 else name + '/'}{PRIMARY[spec.kind]}"


def metrics(specs: dict[str, HeadSpec], logits: dict[str, list[torch.Tensor]], labels: dict[str, list[torch.Tensor]],
            prefix: str = "finetune/") -> dict[str, float]:
    """Held-out scores per head: accuracy and macro-F1 (classification), MSE and Pearson's r (regression),
    token accuracy (token classification). One head: finetune/<metric>; several: finetune/<head>/<metric>."""
    out = {}
    for name, spec in specs.items():
        key = prefix if len(specs) == 1 else f"{prefix}{name}/"
        if spec.kind == "token_classification":
            pred = torch.cat([p.argmax(-1).flatten() for p in logits[name]])
            gold = torch.cat([g.flatten() for g in labels[name]])
            keep = gold != IGNORE
            out[f"{key}token_accuracy"] = (pred[keep] == gold[keep]).double().mean().item()
        elif spec.kind == "regression":
            pred = torch.cat([p.squeeze(-1) for p in logits[name]]).double()
            gold = torch.cat(labels[name]).double()
            out[f"{key}mse"] = ((pred - gold) ** 2).mean().item()
            out[f"{key}pearson"] = torch.corrcoef(torch.stack([pred, gold]))[0, 1].item()
        else:
            pred = torch.cat([p.argmax(-1) for p in logits[name]])
            gold = torch.cat(labels[name])
            out[f"{key}accuracy"] = (pred == gold).double().mean().item()
            f1s = []
            for c in sorted(set(pred.tolist()) | set(gold.tolist())):  # the classes that occur, as scikit-learn
                tp = ((pred == c) & (gold == c)).sum().item()
                fp, fn = ((pred == c) & (gold != c)).sum().item(), ((pred != c) & (gold == c)).sum().item()
                f1s.append(2 * tp / (2 * tp + fp + fn))
            out[f"{key}macro_f1"] = sum(f1s) / len(f1s)
    return out
