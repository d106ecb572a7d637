"""Train GPT-2 with DeepSpeed ZeRO on Ray Train from a tokenized dataset.

    python train/run.py [--config PRESET] [--resume] [--plan] [section.key=value ...]

The dataset is tokenization.output (default <run dir>/data); checkpoints go to checkpoint.dir
(default <run dir>/checkpoints). Starts a local Ray unless RAY_ADDRESS names a cluster.
"""

from __future__ import annotations

import sys

from pipeline.core import storage
from pipeline.core.command import command
from pipeline.core.config import CommandParser, help_config, load_config, preset_in_force


@command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="train/run.py", description=__doc__)
    parser.add_argument("--data", help="tokenized dataset directory (default: <run dir>/data)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory and cost plan (no Ray, no model); exit 2 if it does not fit the GPUs")
    parser.add_overrides()
    args = parser.parse_args(argv)
    preset = preset_in_force(args.config)
    cfg = load_config(preset, args.overrides, {"tokenization.output": args.data} if args.data else None)
    if help_config(args, cfg):
        return 0
    cfg = cfg.with_absolute_paths()  # once, here: every stage takes it resolved
    if args.plan:
        from train import plan  # torch, after the arguments are parsed

        print(plan.check(cfg, preset).report(preset))
        return 0
    storage.configure(cfg.storage.retry_s, cfg.storage.timeout_s)
    for url in dict.fromkeys((cfg.data_dir, cfg.run_dir, cfg.checkpoint_dir)):
        storage.check(url)
    from pipeline.core import runlock
    from train import launch  # torch, Ray, DeepSpeed: after the arguments are parsed

    with runlock.hold(cfg.run_dir, cfg.run.lock_lease_s):  # one run at a time on a run directory
        result = launch.run(cfg, resume=args.resume)
    print(f"train: done at step {result.step}, loss {result.loss:.4f}, {result.tokens:,} tokens; "
          f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
