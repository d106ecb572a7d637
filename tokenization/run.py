"""Tokenize a corpus into token shards, or verify a tokenized dataset.

    python tokenization/run.py [--config PRESET] [--input PATH]... [--output DIR] [section.key=value ...]
    python tokenization/run.py verify DIR
"""

from __future__ import annotations

import argparse
import sys

from pipeline.core import runlock, storage
from pipeline.core.command import command
from pipeline.core.config import CommandParser, help_config, load_config, preset_in_force
from tokenization import job


@command
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:
        parser = argparse.ArgumentParser(prog="tokenization/run.py verify",
                                         description="Check every shard's sha256 against the manifest.")
        parser.add_argument("dataset", help="directory (or URL) holding manifest.json")
        return 0 if job.verify(parser.parse_args(argv[1:]).dataset) else 1

    parser = CommandParser(prog="tokenization/run.py", description=__doc__)
    parser.add_argument("--input", action="append",
                        help="builtin, a file, directory, glob or URL, or hf:OWNER/NAME (repeatable)")
    parser.add_argument("--output", help="dataset directory (default: <run dir>/data)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset made from other input")
    parser.add_overrides()
    args = parser.parse_args(argv)
    values = {"data.input": args.input, "tokenization.output": args.output}
    preset = preset_in_force(args.config)
    cfg = load_config(preset, args.overrides, {k: v for k, v in values.items() if v is not None})
    if help_config(args, cfg):
        return 0
    cfg = cfg.with_absolute_paths()  # once, here: every stage takes it resolved
    storage.configure(cfg.storage.retry_s, cfg.storage.timeout_s)
    storage.check(cfg.data_dir)
    # one job at a time on a dataset directory; the lock sits beside it, so the dataset holds only its own files
    with runlock.hold(cfg.data_dir, cfg.run.lock_lease_s, lock=cfg.data_dir.rstrip("/") + ".lock"):
        job.run(cfg, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
