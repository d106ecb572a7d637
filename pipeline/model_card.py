"""The model card of a pretrained version in the Model Registry (its description, markdown, as MLflow's version
page shows it): the data it learned from, the model and training, its scores beside GPT-2 124M's published ones
(only where they compare), the code, the runs, and the command that reproduces the scores."""

from __future__ import annotations

import shlex

from eval import references
from eval.hellaswag import ACC, ACC_NORM, COMPLETION_ACC, COMPLETION_ACC_NORM
from eval.val_loss import VAL_LOSS
from pipeline.core.config import Config
from pipeline.core.redaction import redact

_ROWS = ((VAL_LOSS, "val loss"), (ACC, "acc [harness: lm-evaluation-harness, 0-shot]"),
         (ACC_NORM, "acc_norm [harness]"), (COMPLETION_ACC, "acc [completion: build-nanogpt style]"),
         (COMPLETION_ACC_NORM, "acc_norm [completion]"))


def pretrained(cfg: Config, *, name: str, version: str, manifest: dict, manifest_sha256: str, manifest_link: str,
               trained: dict, scores: dict[str, float], commit: str, links: dict[str, str | None],
               tracking_uri: str) -> str:
    """trained: the train stage's details (step, tokens); scores: the final checkpoint's (eval stage), by metric
    name; links: label -> a link into MLflow's UI."""
    m, source = cfg.model, manifest.get("source", {})
    corpus = f"hf:{source['repo']}" if source.get("kind") == "hf" else source.get("kind", "files")
    totals = manifest["totals"]
    applicable = references.applicable(cfg)
    swag = references.hellaswag_label(cfg.eval.hellaswag)
    lines = [
        f"## {name} version {version}: GPT-2 pretrained from scratch by gpt2-pipeline",
        "",
        f"**Data**: `{corpus}` tokenized with GPT-2's BPE: train split {totals['train']['tokens']:,} tokens in "
        f"{totals['train']['documents']:,} documents ({totals['train']['shards']} shards), val split "
        f"{totals['val']['tokens']:,} tokens in {totals['val']['documents']:,} documents; manifest "
        f"[{manifest_sha256[:12]}]({manifest_link}), sha256 `{manifest_sha256}`.",
        "",
        f"**Model**: GPT-2, n_layer={m.n_layer}, n_head={m.n_head}, n_embd={m.n_embd}, block_size={m.block_size}, "
        f"vocab_size={m.vocab_size}.",
        "",
        f"**Training**: {trained.get('step', 0):,} steps, {trained.get('tokens', 0):,} tokens "
        f"({cfg.batch.tokens_per_step:,} per step), peak lr {cfg.train.lr:g}, seed {cfg.run.seed}.",
        "",
        f"**Scores** of the final checkpoint; HellaSwag-format items: {swag}.",
        "",
        f"| metric | this model | {references.MODEL}, published |",
        "|---|---|---|",
    ]
    for key, label in _ROWS:
        if key not in scores:
            continue
        if key != VAL_LOSS and cfg.eval.hellaswag == "smoke":
            label = f"smoke items {label}"  # hand-written items: never a HellaSwag score
        elif key != VAL_LOSS:
            label = f"HellaSwag {label}"
        published = references.PUBLISHED.get(key)
        if published is None:
            reference = "not published"
        elif key in applicable:
            reference = f"{published:.4f}"
        else:
            reference = (f"{published:.4f} on FineWeb-Edu val, not comparable to this data" if key == VAL_LOSS else
                         f"{published:.4f} on HellaSwag's validation set, not comparable to these items")
        lines.append(f"| {label} | {scores[key]:.4f} | {reference} |")
    lines += ["", f"**Code**: git commit `{commit}`.", "",
              "**Runs**: " + " · ".join(f"[{label}]({link})" for label, link in links.items() if link), "",
              "**Reproduce the scores**:", "", "```", reproduce(cfg, f"models:/{name}/{version}", tracking_uri), "```"]
    return "\n".join(lines) + "\n"


def reproduce(cfg: Config, model_uri: str, tracking_uri: str) -> str:
    """The eval/run.py command that scores the registered version as the eval stage scored its checkpoint."""
    e = cfg.eval
    args = ["python", "eval/run.py", "--ckpt", model_uri, "--data", cfg.data_dir, "--val-tokens", str(e.val_tokens),
            "--hellaswag", e.hellaswag or "none"]
    if e.hellaswag_limit is not None:
        args += ["--limit", str(e.hellaswag_limit)]
    args += ["--max-new-tokens", str(e.max_new_tokens)]  # the samples, as the eval stage generated them
    args += [f"batch.seq_len={cfg.batch.seq_len}", f"batch.micro_batch_size={cfg.batch.micro_batch_size}"]
    return f"MLFLOW_TRACKING_URI={shlex.quote(redact(tracking_uri))} " + shlex.join(args)
