"""HellaSwag items/s: ours against lm-evaluation-harness (HF backend), same model, items and CPU.

    python bench/hellaswag_throughput.py [--items 128] [--layers 12 --embd 768 --heads 12]

The model is GPT-2's architecture with random weights (the official weights need the Hub), saved in
Hugging Face's layout with GPT-2's tokenizer. The items are HellaSwag-format items derived from the
bundled smoke items (the real set needs the Hub): each with its own numbered scene sentence (so no two
requests are the same and neither side can reuse a result) and its context repeated 1-3 times, which
spreads lengths over the real set's range. The harness runs its own hellaswag task on a local copy;
both must give identical acc/acc_norm and per-choice log-likelihoods within 1e-4 (checked here).
Target: at least 3x the harness's items/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from eval import hellaswag
from pipeline.core.model import checkpoints
from pipeline.core.model.gpt2 import GPT, GPTConfig, save_hf
from tokenization.tokenizer import encoding


def make_items(path: Path, count: int) -> None:
    rows = [json.loads(line) for line in hellaswag.SMOKE.read_text().splitlines()]
    out = []
    for i in range(count):
        row = dict(rows[i % len(rows)])
        row["ctx_a"] = f"Scene {i} of the evening. " + " ".join([row["ctx_a"]] * (1 + i % 3))
        row["ctx"] = row["ctx_a"] + " " + row["ctx_b"]
        row["ind"] = i
        out.append(json.dumps(row) + "\n")
    path.write_text("".join(out))


def harness(model_dir: Path, items: Path, work: Path, batch_size: int) -> tuple[float, dict]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    upstream = Path(lm_eval.tasks.__file__).parent / "hellaswag"  # the harness's own task definition

    tasks = work / f"tasks{batch_size}"
    tasks.mkdir()
    shutil.copy(upstream / "utils.py", tasks / "utils.py")
    yaml = (upstream / "hellaswag.yaml").read_text()
    yaml = yaml.replace("task: hellaswag", "task: hellaswag_bench").replace("dataset_path: Rowan/hellaswag", (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    validation: {items}")).replace("training_split: train\n", "")
    (tasks / "hellaswag_bench.yaml").write_text(yaml)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model_dir},dtype=float32", device="cpu",
                                  tasks=["hellaswag_bench"], task_manager=TaskManager(include_path=str(tasks)),
                                  batch_size=batch_size, log_samples=True)
    return time.perf_counter() - t0, out


def main() -> None:
    from transformers import GPT2Tokenizer

    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=128)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--embd", type=int, default=768)
    parser.add_argument("--harness-batch", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        save_hf(GPT(GPTConfig(n_layer=args.layers, n_head=args.heads, n_embd=args.embd)), work / "model")
        shutil.copy(cache / "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6", work / "model" / "vocab.json")
        shutil.copy(cache / "6d1cbeee0f20b3d9449abfede4726ed8212e3aee", work / "model" / "merges.txt")
        GPT2Tokenizer(vocab=str(work / "model" / "vocab.json"), merges=str(work / "model" / "merges.txt")).save_pretrained(work / "model")
        make_items(work / "items.jsonl", args.items)

        t0 = time.perf_counter()  # like the harness's figure: loading the model and items included
        model, _ = checkpoints.load(str(work / "model"))
        items, _ = hellaswag.load(str(work / "items.jsonl"))
        scores = hellaswag.score(model, encoding().encode_ordinary, items, torch.device("cpu"),
                                 model.config.block_size, protocols=("harness",))
        ours_s = time.perf_counter() - t0
        ours = hellaswag.metrics(items, scores)
        rows = []
        for batch in args.harness_batch:
            seconds, out = harness(work / "model", work / "items.jsonl", work, batch)
            samples = sorted(out["samples"]["hellaswag_bench"], key=lambda s: s["doc_id"])
            lls = np.array([[r[0][0] for r in s["resps"]] for s in samples])
            gap = float(np.abs(lls - scores["harness"]["loglikelihoods"]).max())
            r = out["results"]["hellaswag_bench"]
            same = r["acc,none"] == ours["hellaswag/harness/acc"] and r["acc_norm,none"] == ours["hellaswag/harness/acc_norm"]
            assert same and gap < 1e-4, (r, ours, gap)
            rows.append((batch, seconds, gap, r["acc,none"], r["acc_norm,none"]))
    tokens = int(scores["harness"]["tokens"].sum())
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"model: GPT-2 architecture n_layer={args.layers} n_head={args.heads} n_embd={args.embd}, random weights, fp32")
    print(f"items: {len(items)} (HellaSwag format), {tokens:,} ending tokens scored")
    print(f"ours (packed, harness protocol, load included): {ours_s:.1f} s, {len(items) / ours_s:.2f} items/s; "
          f"acc {ours['hellaswag/harness/acc']:.4f} acc_norm {ours['hellaswag/harness/acc_norm']:.4f}")
    for batch, seconds, gap, acc, acc_norm in rows:
        print(f"lm-evaluation-harness (hf, batch_size={batch}): {seconds:.1f} s, {len(items) / seconds:.2f} items/s; "
              f"acc {acc:.4f} acc_norm {acc_norm:.4f}; max |log-likelihood gap| {gap:.1e}; "
              f"speed-up {seconds / ours_s:.2f}x")


if __name__ == "__main__":
    main()
