"""The pipeline driver: corpus -> shards (-> trainer -> checkpoint -> eval -> MLflow as those stages land).

    python pipeline/run.py [--config PRESET] [section.key=value ...]

With no arguments it runs the `smoke` preset on the built-in corpus with a local Ray.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import cluster
from pipeline.config import ConfigError, load_config
from tokenization import job as tokenize
from tokenization.shards import ShardError
from tokenization.sources import CorpusError
from tokenization.tokenizer import TokenizerUnavailable


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pipeline/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="smoke", help="preset name or YAML path (default: smoke)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        cluster.connect()
        tokenize.run(cfg)
    except (ConfigError, CorpusError, ShardError, TokenizerUnavailable) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
