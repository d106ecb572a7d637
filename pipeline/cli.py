"""`gpt2-pipeline`, the installed command: one entry point onto the five commands.

    gpt2-pipeline run [args...]        pipeline/run.py: the whole pipeline
    gpt2-pipeline tokenize [args...]   tokenization/run.py
    gpt2-pipeline train [args...]      train/run.py
    gpt2-pipeline finetune [args...]   train/finetune.py
    gpt2-pipeline eval [args...]       eval/run.py

Each subcommand takes exactly the arguments of its script (`gpt2-pipeline train --help`); the script's
module is imported only when its subcommand runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> (module whose main(argv) it runs, what it does)
COMMANDS = {
    "run": ("pipeline.run", "the whole pipeline: tokenize, train, eval, register (and finetune)"),
    "tokenize": ("tokenization.run", "tokenize a corpus into shards, or verify a tokenized dataset"),
    "train": ("train.run", "train GPT-2 with DeepSpeed ZeRO on Ray Train"),
    "finetune": ("train.finetune", "fine-tune a pretrained model with task heads"),
    "eval": ("eval.run", "evaluate a checkpoint: validation loss, HellaSwag, samples"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(
        prog="gpt2-pipeline", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="GPT-2 pretraining from raw corpus to registered model.",
        epilog="commands:\n" + "\n".join(f"  {name:<10}{what}" for name, (_, what) in COMMANDS.items())
        + "\n\n`gpt2-pipeline COMMAND --help` (or --help-config) says more.")
    parser.add_argument("command", choices=list(COMMANDS), metavar="{" + ",".join(COMMANDS) + "}")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])  # only the subcommand: everything after it is the command's
    module = importlib.import_module(COMMANDS[args.command][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
