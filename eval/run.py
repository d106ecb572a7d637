"""Evaluate a checkpoint: validation loss, HellaSwag (lm-evaluation-harness protocol and build-nanogpt's
completion style, each labelled), and generated text.

    python eval/run.py --ckpt PATH [--data DIR] [--hellaswag official|smoke|PATH] [--limit N]
                       [--prompt TEXT]... [--greedy | --temperature T --top-k K --top-p P | --beams B]
                       [--num-samples N] [--max-new-tokens N] [--seed S] [--output DIR] [--workers N]

--ckpt takes a checkpoint of our trainer (or its checkpoint directory), a DeepSpeed checkpoint
directory, a Hugging Face GPT-2 directory, hf:NAME (e.g. hf:gpt2) when the Hub is reachable, or a registered
model, models:/NAME/VERSION or models:/NAME@ALIAS (from $MLFLOW_TRACKING_URI's registry).
--output also gets scores.png: the checkpoint's scores beside GPT-2 124M's published ones where they apply.
"""

from __future__ import annotations

import sys

from pipeline.core import storage
from pipeline.core.command import command
from pipeline.core.config import CommandParser, help_config, load_config, preset_in_force


@command
def main(argv: list[str] | None = None) -> int:
    p = CommandParser(prog="eval/run.py", description=__doc__)
    p.add_argument("--ckpt", required=True, help="checkpoint directory, DeepSpeed or HF directory, hf:NAME, or models:/...")
    p.add_argument("--data", help="tokenized dataset for the validation loss (default: the preset's)")
    p.add_argument("--no-val", action="store_true", help="skip the validation loss")
    p.add_argument("--val-tokens", type=int, help="token budget of the validation loss")
    p.add_argument("--hellaswag", help="official (download once), smoke, a JSONL/parquet path, or none")
    p.add_argument("--limit", type=int, help="score the first N HellaSwag items only")
    p.add_argument("--prompt", action="append", help="prompt to continue (repeatable)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--num-samples", type=int)
    p.add_argument("--greedy", action="store_true", default=None)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--beams", type=int, help="beam search with this many beams")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int, default=1, help="spread HellaSwag over this many Ray workers")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--output", help="directory for results.json and scores.png")
    p.add_overrides()
    a = p.parse_args(argv)
    values = {"tokenization.output": a.data, "eval.val_tokens": a.val_tokens, "eval.hellaswag_limit": a.limit,
              "eval.prompts": a.prompt, "eval.max_new_tokens": a.max_new_tokens, "eval.num_samples": a.num_samples,
              "eval.greedy": a.greedy, "eval.temperature": a.temperature, "eval.top_k": a.top_k,
              "eval.top_p": a.top_p, "eval.num_beams": a.beams, "eval.seed": a.seed}
    values = {k: v for k, v in values.items() if v is not None}
    if a.hellaswag is not None:
        values["eval.hellaswag"] = None if a.hellaswag == "none" else a.hellaswag
    preset = preset_in_force(a.config)
    cfg = load_config(preset, a.overrides, values)
    if help_config(args=a, cfg=cfg):
        return 0
    cfg = cfg.with_absolute_paths()  # once, here: every stage takes it resolved
    storage.configure(cfg.storage.retry_s, cfg.storage.timeout_s)
    if not a.ckpt.startswith(("hf:", "models:/")):
        storage.check(a.ckpt, write=False)
    from eval import suite  # torch (and Ray with --workers): once the arguments are parsed

    suite.run(cfg, a.ckpt, a.output, data=not a.no_val, workers=a.workers, device=a.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
