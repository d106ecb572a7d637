"""Fine-tune a pretrained GPT-2 with task heads, on DeepSpeed ZeRO under Ray Train.

    python train/finetune.py --ckpt SPEC --task SOURCE [--eval-task SOURCE] [--config PRESET] [--resume]
                             [finetune.key=value ...]

--ckpt: what eval/run.py --ckpt takes (a checkpoint of ours or its directory, local or on object storage;
a DeepSpeed or Hugging Face directory; hf:NAME), or a registered model: models:/gpt2-pipeline@best.
--task: JSONL/Parquet file(s) or hf:OWNER/NAME (finetune.hf_config, train_split, eval_split); the fields
are finetune.text_fields and finetune.label_field, the head finetune.head (classification, regression,
token_classification, multi) with finetune.num_labels. Output: finetune.output (default
<run dir>/finetune); metrics go to MLflow under the checkpoint's lineage and the result is registered
as finetune.registered_model.
"""

from __future__ import annotations

import sys

from pipeline.core.command import command
from pipeline.core.config import CommandParser, help_config, load_config, preset_in_force


@command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="train/finetune.py", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="starting checkpoint (as eval/run.py --ckpt) or models:/NAME@ALIAS")
    parser.add_argument("--task", help="task data: JSONL/Parquet path or hf:NAME (finetune.task)")
    parser.add_argument("--eval-task", help="held-out data (finetune.eval_task; default: a held-out part of --task)")
    parser.add_argument("--resume", action="store_true", help="continue the fine-tune in finetune.output")
    parser.add_overrides()
    args = parser.parse_args(argv)
    preset = preset_in_force(args.config)
    values = {"finetune.task": args.task, "finetune.eval_task": args.eval_task}
    cfg = load_config(preset, args.overrides, {k: v for k, v in values.items() if v is not None})
    if help_config(args, cfg):
        return 0
    cfg = cfg.with_absolute_paths()  # once, here: every stage takes it resolved
    from pipeline.core import runlock, storage

    storage.configure(cfg.storage.retry_s, cfg.storage.timeout_s)
    from train import finetuning  # torch, Ray, DeepSpeed, MLflow: imported once the arguments are parsed

    with runlock.hold(cfg.run_dir, cfg.run.lock_lease_s):  # one run at a time on a run directory
        result = finetuning.run(cfg, args.ckpt, resume=args.resume)
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    print(f"finetune: done at step {result.step}, loss {result.loss:.4f}; held out: {scores}; "
          f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
