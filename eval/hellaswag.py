"""HellaSwag, scored exactly as lm-evaluation-harness scores it, with build-nanogpt's completion style beside it.

Two protocols, always named in results:
- `harness` (lm-evaluation-harness `hellaswag`, 0-shot): context = preprocess(activity_label + ": " +
  ctx_a + " " + ctx_b.capitalize()), choices = preprocess(ending) after a " " delimiter, tokenized as the
  harness does (context + continuation encoded together, split at the context's length). acc = argmax of
  the summed log-likelihood; acc_norm = argmax of log-likelihood / len(choice) in characters.
- `completion` (build-nanogpt's hellaswag.py): the raw ctx and " " + ending tokenized apart; acc = argmin
  of the summed loss, acc_norm = argmin of the mean per-token loss.

Speed: each item is one packed sequence, its context once and the four endings after it, every ending
attending to the context and to itself only (the mask and positions make this exact), and the LM head
runs only where an ending token is predicted. Items whose packed form would not fit the model's
context fall back to one row per ending, left-truncated as the harness truncates.
This module imports only torch, numpy and tokenization, so the trainer can call it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.core.command import UserError
from tokenization.contamination import HUB_FILE, HUB_REPO, HUB_REVISION, official_cache

# hellaswag_val.jsonl as released (sha256 from the `datasets` library's record of the original file)
OFFICIAL_SHA256 = "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588"
OFFICIAL_ITEMS = 10042
_FIELDS = ("ind", "activity_label", "ctx_a", "ctx_b", "ctx", "split", "split_type", "label", "endings", "source_id")
PROTOCOLS = ("harness", "completion")
# The metrics this module produces (metrics()): the names every reader (the driver's report, the registry's
# "best") imports from here. ACC_NORM under the harness protocol is the number published tables compare.
ACC = "hellaswag/harness/acc"
ACC_NORM = "hellaswag/harness/acc_norm"
COMPLETION_ACC = "hellaswag/completion/acc"
COMPLETION_ACC_NORM = "hellaswag/completion/acc_norm"
METRICS = (ACC, ACC_NORM, COMPLETION_ACC, COMPLETION_ACC_NORM)


class HellaSwagError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class Item:
    activity_label: str
    ctx_a: str
    ctx_b: str
    ctx: str
    endings: tuple[str, ...]
    label: int


# --- data -------------------------------------------------------------------------------------------

SMOKE = Path(__file__).parent / "data" / "hellaswag_smoke.jsonl"  # hand-written items, see data/README.md


def load(source: str = "official", cache_dir: str | None = None, limit: int | None = None) -> tuple[list[Item], dict]:
    """Items from "official" (the validation set, downloaded once from the Hugging Face Hub, verified
    and cached), "smoke" (the bundled hand-written items) or a JSONL (original release) or Parquet
    (the Hub's) file; the first `limit` only when given."""
    path = str(download(cache_dir)) if source == "official" else str(SMOKE) if source == "smoke" else source
    if not os.path.exists(path):
        raise HellaSwagError(f"{path}: no such HellaSwag file")
    data = Path(path).read_bytes()
    rows = _parquet_rows(path) if path.endswith(".parquet") else _jsonl_rows(path, data)
    items = [_item(row, where) for where, row in rows]
    digest = hashlib.sha256(data).hexdigest()
    official = digest == OFFICIAL_SHA256 or (path.endswith(".parquet") and _canonical_sha256(rows) == OFFICIAL_SHA256)
    items = items[:limit] if limit is not None else items
    return items, {"source": source, "path": path, "sha256": digest, "items": len(items),
                   "official_validation_set": official and len(items) == OFFICIAL_ITEMS}


def _jsonl_rows(path: str, data: bytes) -> list[tuple[str, dict]]:
    rows = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{n}", json.loads(line)))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HellaSwagError(f"{path}:{n}: not a JSON object ({err})") from None
    return rows


def _parquet_rows(path: str) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    return [(f"{path}: row {n}", row) for n, row in enumerate(pq.read_table(path).to_pylist(), 1)]


def _item(row: dict, where: str) -> Item:
    try:
        endings = tuple(row["endings"])
        label = int(row["label"])
        item = Item(row["activity_label"], row["ctx_a"], row["ctx_b"], row["ctx"], endings, label)
    except (KeyError, TypeError, ValueError) as err:
        raise HellaSwagError(f"{where}: not a HellaSwag item ({type(err).__name__}: {err})") from None
    if len(endings) != 4 or not all(isinstance(e, str) for e in endings) or not 0 <= label < 4:
        raise HellaSwagError(f"{where}: a HellaSwag item has 4 string endings and a label in 0-3")
    return item


def _canonical_jsonl(rows: list[tuple[str, dict]], ensure_ascii: bool) -> bytes:
    """The rows written back in the original release's layout: its field order, integer labels."""
    lines = []
    for _, row in rows:
        record = {k: (int(row[k]) if k == "label" else list(row[k]) if k == "endings" else row[k]) for k in _FIELDS}
        lines.append(json.dumps(record, ensure_ascii=ensure_ascii) + "\n")
    return "".join(lines).encode()


def _canonical_sha256(rows: list[tuple[str, dict]]) -> str | None:
    for ensure_ascii in (True, False):
        digest = hashlib.sha256(_canonical_jsonl(rows, ensure_ascii)).hexdigest()
        if digest == OFFICIAL_SHA256:
            return digest
    return None


def download(cache_dir: str | None = None) -> Path:
    """The official validation set as the original JSONL, fetched once from the Hub's Parquet copy
    (the original GitHub files are no longer served) and accepted only if it reproduces the
    released file byte for byte (OFFICIAL_SHA256)."""
    cache = official_cache(cache_dir)
    target = cache / "hellaswag_val.jsonl"
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == OFFICIAL_SHA256:
        return target
    try:
        from huggingface_hub import hf_hub_download

        parquet = hf_hub_download(HUB_REPO, HUB_FILE, repo_type="dataset", revision=HUB_REVISION)
    except Exception as err:  # offline, Hub errors: all mean "pass a local file"
        raise HellaSwagError(f"cannot download HellaSwag from the Hugging Face Hub ({HUB_REPO}): "
                             f"{type(err).__name__}: {err}. Pass --hellaswag PATH to hellaswag_val.jsonl "
                             f"or the Hub's validation parquet") from err
    rows = _parquet_rows(parquet)
    for ensure_ascii in (True, False):
        data = _canonical_jsonl(rows, ensure_ascii)
        if hashlib.sha256(data).hexdigest() == OFFICIAL_SHA256:
            cache.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
            return target
    raise HellaSwagError(f"{HUB_REPO} ({HUB_FILE}, {len(rows)} items) does not reproduce the released "
                         f"hellaswag_val.jsonl (sha256 {OFFICIAL_SHA256}); refusing to score altered data")


# --- the two protocols ------------------------------------------------------------------------------

def preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleaning (WikiHow's bracketed artifacts)."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def harness_texts(item: Item) -> tuple[str, list[str]]:
    """(context, choices) as the harness's hellaswag task builds them."""
    ctx = item.ctx_a + " " + item.ctx_b.capitalize()
    return preprocess(item.activity_label + ": " + ctx), [preprocess(e) for e in item.endings]


def _harness_tokens(encode: Callable[[str], list[int]], item: Item) -> tuple[list[int], list[list[int]]]:
    """The harness's _encode_pair: trailing context spaces move to the continuation, the pair is
    encoded whole and split at the context's token count."""
    context, choices = harness_texts(item)
    spaces = len(context) - len(context.rstrip())
    head = context[:-spaces] if spaces else context
    context_tokens = encode(head)
    return context_tokens, [encode(head + context[len(head):] + " " + c)[len(context_tokens):] for c in choices]


def _completion_tokens(encode: Callable[[str], list[int]], item: Item) -> tuple[list[int], list[list[int]]]:
    return encode(item.ctx), [encode(" " + e) for e in item.endings]


# --- scoring ----------------------------------------------------------------------------------------

@dataclass
class _Row:
    tokens: list[int]
    positions: list[int]
    spans: list[tuple[int, list[int], list[int]]]  # (choice, positions predicting it, its tokens)
    blocks: list[tuple[int, int]]  # (start, end) of each ending block; the prefix is [0, blocks[0][0])


def _packed(context: list[int], endings: list[list[int]]) -> _Row:
    """The context, then each ending without its last token (no prediction is made from it)."""
    tokens, positions, spans, blocks = list(context), list(range(len(context))), [], []
    for j, ending in enumerate(endings):
        start = len(tokens)
        tokens += ending[:-1]
        positions += range(len(context), len(context) + len(ending) - 1)
        spans.append((j, [len(context) - 1] + list(range(start, start + len(ending) - 1)), ending))
        blocks.append((start, start + len(ending) - 1))
    return _Row(tokens, positions, spans, blocks)


_DUMMY = _Row([0, 0], [0, 1], [(0, [0], [0])], [])  # keeps a rank with no work in step with the others


def _rows(context: list[int], endings: list[list[int]], block_size: int) -> list[_Row]:
    """One sequence per item when it fits; else one per ending, left-truncated as the harness does."""
    row = _packed(context, endings)
    if len(row.tokens) <= block_size:
        return [row]
    rows = []
    for j, ending in enumerate(endings):
        whole = (context + ending)[-(block_size + 1):][:-1]
        n = len(whole)
        rows.append(_Row(whole, list(range(n)), [(j, list(range(n - len(ending), n)), ending)], []))
    return rows


def _mask(row: _Row, length: int) -> torch.Tensor:
    """(length, length): causal within the prefix and within each ending block, every ending block
    sees the whole prefix, padding sees only itself."""
    n = len(row.tokens)
    mask = torch.zeros(length, length, dtype=torch.bool)
    mask[:n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
    for start, end in row.blocks:
        mask[start:end, row.blocks[0][0]:start] = False  # not the endings before this one
    mask[range(n, length), range(n, length)] = True
    return mask


def score(model, encode: Callable[[str], list[int]], items: list[Item], device: torch.device, block_size: int,
          protocols=PROTOCOLS, batch_tokens: int | None = None, rank: int = 0, world: int = 1,
          collective: bool = False) -> dict:
    """Per-choice log-likelihoods (and token counts) of every item under each protocol.

    `model` is our GPT (or a DeepSpeed engine around it) with context `block_size`. Only items
    rank::world are scored (the others stay zero). With `collective` (training ranks under
    torch.distributed) the ranks run the same number of forward passes, since ZeRO-3 gathers
    parameters collectively, and the results are all-reduced.
    """
    block = block_size
    # tokens per forward pass: small batches stay in a CPU's caches (measured best near 1024); GPUs want more
    batch_tokens = batch_tokens or (16384 if device.type == "cuda" else 1024)
    mine = list(range(rank, len(items), world))
    per_item: dict[str, np.ndarray] = {p: np.zeros((len(items), 4)) for p in protocols}
    counts: dict[str, np.ndarray] = {p: np.zeros((len(items), 4), dtype=np.int64) for p in protocols}
    work = []  # (item, protocol, row)
    for i in mine:
        for p in protocols:
            ctx, endings = (_harness_tokens if p == "harness" else _completion_tokens)(encode, items[i])
            work += [(i, p, row) for row in _rows(ctx, endings, block)]
    work.sort(key=lambda w: len(w[2].tokens))  # similar lengths together: less padding
    batches, current = [], []
    for w in work:
        if current and (len(current) + 1) * len(w[2].tokens) > batch_tokens:
            batches.append(current)
            current = []
        current.append(w)
    if current:
        batches.append(current)
    passes = _same_count(len(batches), device) if collective else len(batches)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for b in range(passes):
            if b >= len(batches):
                _forward(model, [_DUMMY], device)
                continue
            batch = batches[b]
            for (i, p, row), row_lls in zip(batch, _forward(model, [w[2] for w in batch], device)):
                for (j, ll), (_, _, tokens) in zip(row_lls, row.spans):
                    per_item[p][i, j] = ll
                    counts[p][i, j] = len(tokens)
    model.train(was_training)
    if collective:
        for p in protocols:
            per_item[p], counts[p] = _gather(per_item[p], device), _gather(counts[p], device)
    return {p: {"loglikelihoods": per_item[p], "tokens": counts[p]} for p in protocols}


def _forward(model, rows: list[_Row], device: torch.device) -> list[list[tuple[int, float]]]:
    length = max(len(r.tokens) for r in rows)
    k = max(sum(len(s[1]) for s in r.spans) for r in rows)
    idx = torch.zeros(len(rows), length, dtype=torch.long)
    pos = torch.zeros(len(rows), length, dtype=torch.long)
    at = torch.zeros(len(rows), k, dtype=torch.long)
    target = torch.zeros(len(rows), k, dtype=torch.long)
    for r, row in enumerate(rows):
        idx[r, :len(row.tokens)] = torch.tensor(row.tokens)
        pos[r, :len(row.positions)] = torch.tensor(row.positions)
        flat_at = [a for s in row.spans for a in s[1]]
        at[r, :len(flat_at)] = torch.tensor(flat_at)
        target[r, :len(flat_at)] = torch.tensor([t for s in row.spans for t in s[2]])
    mask = torch.stack([_mask(row, length) for row in rows])
    logits, _ = model(idx.to(device), positions=pos.to(device), mask=mask.to(device), logits_at=at.to(device))
    logits = logits.float()
    # log p(target) = logit[target] - logsumexp(logits): no (B, K, V) log-softmax tensor written out
    logprobs = (logits.gather(-1, target.to(device)[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)).cpu()
    out = []
    for r, row in enumerate(rows):
        lls, offset = [], 0
        for j, where, _ in row.spans:
            lls.append((j, float(logprobs[r, offset:offset + len(where)].double().sum())))
            offset += len(where)
        out.append(lls)
    return out


def _same_count(n: int, device: torch.device) -> int:
    import torch.distributed as dist

    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _gather(values: np.ndarray, device: torch.device) -> np.ndarray:
    import torch.distributed as dist

    t = torch.from_numpy(values).to(device)
    dist.all_reduce(t)  # each rank filled only its own items; the others are zero
    return t.cpu().numpy()


def metrics(items: list[Item], scores: dict) -> dict:
    """acc and acc_norm per protocol, each named with its protocol."""
    labels = np.array([it.label for it in items])
    out = {}
    if "harness" in scores:
        lls = scores["harness"]["loglikelihoods"]
        lengths = np.array([[len(c) for c in harness_texts(it)[1]] for it in items], dtype=float)
        out[ACC] = float((lls.argmax(1) == labels).mean())
        out[ACC_NORM] = float(((lls / lengths).argmax(1) == labels).mean())
    if "completion" in scores:
        loss = -scores["completion"]["loglikelihoods"]
        out[COMPLETION_ACC] = float((loss.argmin(1) == labels).mean())
        out[COMPLETION_ACC_NORM] = float(((loss / scores["completion"]["tokens"]).argmin(1) == labels).mean())
    return out  # the number of items is a constant of the run: a param (hellaswag.items), not a metric
