"""The evaluation stage: validation loss, HellaSwag (both protocols) and generated samples for one
checkpoint, as a table, a results JSON, and metrics for the tracker."""

from __future__ import annotations

import platform
import time

import torch

from eval import contamination, figures, generate, hellaswag, references, val_loss
from pipeline.core import storage
from pipeline.core.config import Config
from pipeline.core.model import checkpoints
from pipeline.core.storage import join
from tokenization.shards import manifest_hash
from tokenization.tokenizer import encoding

RESULTS = "results.json"
FIGURE = "scores.png"  # the checkpoint's scores beside the published references, next to RESULTS


def run(cfg: Config, ckpt: str, output: str | None = None, *, data: bool = True, workers: int = 1,
        device: str | None = None, log=print) -> dict:
    """Evaluate `ckpt`; write the results JSON to `output` (a directory) when given; return the results."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    timing, started = {}, time.perf_counter()
    model, info = checkpoints.load(ckpt, device)
    timing["load_s"] = time.perf_counter() - started
    results: dict = {"checkpoint": {"spec": ckpt, **info}, "metrics": {}, "timing": timing,
                     "environment": {"python": platform.python_version(), "torch": torch.__version__,
                                     "device": str(device)}}
    enc = encoding()

    if data and storage.exists(join(cfg.data_dir, "manifest.json")):
        t0 = time.perf_counter()
        seq_len = min(cfg.batch.seq_len, model.config.block_size)
        x, y = val_loss.val_sequences(cfg.data_dir, seq_len, cfg.eval.val_tokens)
        val = val_loss.evaluate(lambda idx, tgt: model(idx, tgt)[1], x, y, cfg.batch.micro_batch_size, device)
        results["val"] = {**val, "data": cfg.data_dir, "manifest_sha256": manifest_hash(cfg.data_dir),
                          "seq_len": seq_len}
        results["metrics"].update({val_loss.VAL_LOSS: val["loss"], val_loss.VAL_PERPLEXITY: val["perplexity"]})
        timing["val_s"] = time.perf_counter() - t0

    if cfg.eval.hellaswag:
        t0 = time.perf_counter()
        items, data_info = hellaswag.load(cfg.eval.hellaswag, limit=cfg.eval.hellaswag_limit)
        scores = (score_on_workers(ckpt, items, workers, device) if workers > 1 else
                  hellaswag.score(model, enc.encode_ordinary, items, device, model.config.block_size))
        found = hellaswag.metrics(items, scores)
        clean, contamination_info = contamination.clean_metrics(cfg, items, scores, data_info)
        found.update(clean)
        results["hellaswag"] = {"data": data_info, "protocols": {
            "harness": "lm-evaluation-harness hellaswag, 0-shot: acc = argmax summed log-likelihood, "
                       "acc_norm = argmax log-likelihood / ending length in characters",
            "completion": "build-nanogpt completion style: raw ctx, acc = argmin summed loss, "
                          "acc_norm = argmin mean per-token loss"},
            "tokens_scored": {p: int(s["tokens"].sum()) for p, s in scores.items()},
            "contamination": contamination_info}
        results["metrics"].update(found)
        timing["hellaswag_s"] = time.perf_counter() - t0
        timing["hellaswag_items_per_s"] = len(items) / timing["hellaswag_s"]

    if cfg.eval.prompts and cfg.eval.max_new_tokens:
        t0 = time.perf_counter()
        results["samples"] = samples(model, cfg)
        timing["generation_s"] = time.perf_counter() - t0
    timing["total_s"] = time.perf_counter() - started
    if output:
        storage.write_json(join(output, RESULTS), results)
        storage.write_bytes(join(output, FIGURE), figures.png(figure(results, cfg)))
    table(results, log)
    return results


def figure(results: dict, cfg: Config):
    """The training figure's layout for one checkpoint: its scores as points at the tokens it was trained on."""
    c = results["checkpoint"]
    point = {figures.TOKENS: c.get("tokens") or 0, **results["metrics"]}
    return figures.draw([point], references.applicable(cfg), f"{c['spec']} (step {c.get('step')})",
                        references.hellaswag_label(cfg.eval.hellaswag))


def samples(model, cfg: Config) -> list[dict]:
    e, enc = cfg.eval, encoding()
    mode = ("greedy" if e.greedy else f"beam search ({e.num_beams} beams)" if e.num_beams > 1 else
            f"sampling (temperature {e.temperature}, top-k {e.top_k}, top-p {e.top_p}, seed {e.seed})")
    out = []
    for prompt in e.prompts:
        tokens = enc.encode_ordinary(prompt)
        budget = min(e.max_new_tokens, model.config.block_size - len(tokens))
        if e.num_beams > 1:
            texts = [generate.beam_search(model, tokens, budget, e.num_beams)]
        else:
            texts = generate.sample(model, tokens, budget, greedy=e.greedy, temperature=e.temperature, top_k=e.top_k,
                                    top_p=e.top_p, num_samples=1 if e.greedy else e.num_samples, seed=e.seed)
        out.append({"prompt": prompt, "mode": mode, "completions": [enc.decode(t) for t in texts]})
    return out


def score_on_workers(ckpt: str, items: list, workers: int, device: torch.device) -> dict:
    """HellaSwag split over Ray workers (a GPU each when the cluster has them), each loading the model."""
    import ray

    from pipeline.core import cluster

    cluster.connect()
    gpus = 1 if device.type == "cuda" else 0

    @ray.remote(num_gpus=gpus)
    def part(rank: int) -> dict:
        model, _ = checkpoints.load(ckpt, "cuda" if gpus else "cpu")
        return hellaswag.score(model, encoding().encode_ordinary, items, model.lm_head.weight.device,
                               model.config.block_size, rank=rank, world=workers)

    parts = ray.get([part.remote(r) for r in range(workers)])
    return {p: {k: sum(part[p][k] for part in parts) for k in ("loglikelihoods", "tokens")} for p in parts[0]}


def table(results: dict, log=print) -> None:
    rows = []
    m = results["metrics"]
    if "val" in results:
        v = results["val"]
        rows += [("val loss", f"{v['loss']:.4f}", f"mean cross-entropy over {v['tokens']:,} tokens of {v['data']}"),
                 ("val perplexity", f"{v['perplexity']:.2f}", "")]
    if "hellaswag" in results:
        d = results["hellaswag"]["data"]
        what = ("official validation set" if d["official_validation_set"] else
                f"{references.hellaswag_label(d['source'])}, {d['path']}")
        name = "smoke items" if d["source"] == "smoke" else "hellaswag"  # never a HellaSwag score when it is not
        for protocol, label in (("harness", "lm-evaluation-harness, 0-shot"), ("completion", "build-nanogpt completion style")):
            for metric in ("acc", "acc_norm"):
                key = f"hellaswag/{protocol}/{metric}"
                if key in m:
                    rows.append((f"{name} {metric} [{protocol}]", f"{m[key]:.4f}", f"{label}; {d['items']:,} items, {what}"))
        clean = results["hellaswag"].get("contamination", {})
        if "hellaswag_clean/harness/acc_norm" in m:
            rows.append((f"{name} acc_norm [clean]", f"{m['hellaswag_clean/harness/acc_norm']:.4f}",
                         f"harness; the {clean['items_clean']:,} items no training document overlaps "
                         f"({m[contamination.SHARE]:.1%} contaminated)"))
    c = results["checkpoint"]
    log(f"eval: {c['spec']} ({c['layout']}{', step ' + str(c['step']) if c.get('step') is not None else ''})")
    width = max((len(r[0]) for r in rows), default=0)
    for name, value, note in rows:
        log(f"  {name:<{width}}  {value:>8}  {note}")
    for s in results.get("samples", []):
        for completion in s["completions"]:
            log(f"  sample [{s['mode']}]: {s['prompt']!r} -> {completion!r}")
    t = results["timing"]
    log(f"  {t['total_s']:.1f} s" + (f"; HellaSwag {t['hellaswag_items_per_s']:.1f} items/s" if "hellaswag_s" in t else ""))
