"""Train GPT-2 with DeepSpeed ZeRO on Ray Train from a tokenized dataset.

    python train/run.py [--config PRESET] [--resume] [--plan] [section.key=value ...]

The dataset is tokenization.output (default <run dir>/data); checkpoints go to checkpoint.dir
(default <run dir>/checkpoints). Starts a local Ray unless RAY_ADDRESS names a cluster.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core import storage
from pipeline.core.config import PRESET_HELP, ConfigError, load_config, preset_in_force
from tokenization.shards import ShardError
from train import launch, plan
from pipeline.core.model.checkpoints import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help=PRESET_HELP)
    parser.add_argument("--data", help="tokenized dataset directory (default: <run dir>/data)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("--plan", action="store_true",
                        help="print the memory and cost plan (no Ray, no model); exit 2 if it does not fit the GPUs")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    preset = preset_in_force(args.config)
    try:
        cfg = load_config(preset, args.overrides, {"tokenization.output": args.data} if args.data else None).with_absolute_paths()
        if args.plan:
            print(plan.check(cfg, preset).report(preset))
            return 0
        for url in dict.fromkeys((cfg.data_dir, cfg.run_dir, cfg.checkpoint_dir)):
            storage.check(url)
        result = launch.run(cfg, resume=args.resume)
    except (ConfigError, storage.StorageError, ShardError, CheckpointError, launch.TrainingFailed, plan.PlanError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"train: done at step {result.step}, loss {result.loss:.4f}, {result.tokens:,} tokens; "
          f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
