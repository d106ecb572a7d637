"""Train GPT-2 with DeepSpeed ZeRO on Ray Train from a tokenized dataset.

    python train/run.py [--config PRESET] [--resume] [section.key=value ...]

The dataset is tokenization.output (default <run dir>/data); checkpoints go to checkpoint.dir
(default <run dir>/checkpoints). Starts a local Ray unless RAY_ADDRESS names a cluster.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core import storage
from pipeline.core.config import ConfigError, load_config
from tokenization.shards import ShardError
from train import launch
from train.checkpoint import CheckpointError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smoke", help="preset name or YAML path (default: smoke)")
    parser.add_argument("--data", help="tokenized dataset directory (default: <run dir>/data)")
    parser.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, {"tokenization.output": args.data} if args.data else None)
        for url in dict.fromkeys((cfg.data_dir, cfg.run_dir, cfg.checkpoint_dir)):
            storage.check(url)
        result = launch.run(cfg, resume=args.resume)
    except (ConfigError, storage.StorageError, ShardError, CheckpointError, launch.TrainingFailed) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"train: done at step {result.step}, loss {result.loss:.4f}, {result.tokens:,} tokens; "
          f"checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
