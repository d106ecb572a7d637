"""The five commands' shared shell: --help-config (the config reference, from the fields' docs), --help
without the heavy libraries, one error family reported as one line with exit code 2, and the
`gpt2-pipeline` entry point."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, config_leaves

# script -> (module, subcommand of gpt2-pipeline)
COMMANDS = {
    "pipeline/run.py": ("pipeline.run", "run"),
    "tokenization/run.py": ("tokenization.run", "tokenize"),
    "train/run.py": ("train.run", "train"),
    "train/finetune.py": ("train.finetune", "finetune"),
    "eval/run.py": ("eval.run", "eval"),
}
HEAVY = ("torch", "ray", "deepspeed", "mlflow", "transformers")


def entry_point() -> str:
    """The installed `gpt2-pipeline` script ([project.scripts]) of this interpreter's environment."""
    found = Path(sys.executable).parent / "gpt2-pipeline"
    path = str(found) if found.exists() else shutil.which("gpt2-pipeline")
    assert path, "gpt2-pipeline is not installed: pip install -e ."
    return path


def reference_rows(out: str) -> dict[str, tuple[str, str, str]]:
    """--help-config's output -> {key: (type, value, doc)}; the first line names the preset in force."""
    lines = out.splitlines()
    assert lines[0].startswith("config: preset "), lines[0]
    rows = {}
    for line in lines[1:]:
        key, type_, value, doc = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        assert key not in rows, f"{key} listed twice"
        rows[key] = (type_, value, doc)
    return rows


@pytest.mark.parametrize("script", COMMANDS)
def test_help_config_lists_every_key_with_its_type_value_in_force_and_doc(script, capsys):
    main = importlib.import_module(COMMANDS[script][0]).main
    from pipeline.core.config import load_config

    smoke = load_config("smoke")
    assert main(["--help-config", "--config", "smoke", "train.lr=3e-4", "finetune.max_steps=7"]) == 0
    rows = reference_rows(capsys.readouterr().out)
    leaves = config_leaves()
    assert set(rows) == set(leaves)  # exactly the leaf fields of the config
    for key, (type_, value, doc) in rows.items():
        assert type_ and value and doc, key
        assert " ".join(leaves[key].description.split()) == doc, key  # the field's docstring, whole
    assert json.loads(rows["model.n_layer"][1]) == smoke.model.n_layer != load_config("base").model.n_layer
    assert rows["model.n_layer"][0] == "int"
    assert json.loads(rows["train.lr"][1]) == 3e-4 and json.loads(rows["finetune.max_steps"][1]) == 7
    assert json.loads(rows["eval.hellaswag"][1]) == smoke.eval.hellaswag and rows["eval.hellaswag"][0] == "str | null"
    assert json.loads(rows["finetune.heads.<name>.weight"][1]) == 1.0
    assert "loss" in rows["finetune.heads.<name>.weight"][2]


def test_help_config_shows_flags_and_configured_heads(capsys):
    import eval.run
    import tokenization.run
    import train.finetune

    # no --ckpt: --help-config needs no required argument, as --help
    assert eval.run.main(["--help-config", "--temperature", "0.5", "--prompt", "Once"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "config: preset 'base' (production defaults; no --config given)"
    rows = reference_rows(out)
    assert json.loads(rows["eval.temperature"][1]) == 0.5 and json.loads(rows["eval.prompts"][1]) == ["Once"]
    assert tokenization.run.main(["--help-config", "--output", "/data/tokens"]) == 0
    assert json.loads(reference_rows(capsys.readouterr().out)["tokenization.output"][1]) == "/data/tokens"
    assert train.finetune.main(["--help-config", "finetune.head=multi",
                                "finetune.heads={sentiment: {weight: 2.5}, topic: {num_labels: 4}}"]) == 0
    rows = reference_rows(capsys.readouterr().out)
    assert json.loads(rows["finetune.heads.sentiment.weight"][1]) == 2.5
    assert json.loads(rows["finetune.heads.topic.num_labels"][1]) == 4
    assert rows["finetune.heads.topic.weight"][2] == rows["finetune.heads.<name>.weight"][2]
    # a bad override is refused as in a real run
    assert eval.run.main(["--help-config", "eval.temprature=1"]) == 2
    assert "did you mean 'eval.temperature'" in capsys.readouterr().err


PROBE = """
import sys
from {module} import main
for argv in (["--help"], ["--help-config"]):
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    assert code in (0, None), (argv, code)
print("HEAVY", sorted(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("script", COMMANDS)
def test_help_imports_no_heavy_library(script, tmp_path):
    module, sub = COMMANDS[script]
    # as a script, and through the entry point
    for argv in ([sys.executable, str(REPO / script), "--help"], [entry_point(), sub, "--help"]):
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert proc.returncode == 0 and "usage:" in proc.stdout and "--help-config" in proc.stdout, proc.stderr
    # checked in sys.modules after main(["--help"]) and main(["--help-config"]), not by a timer
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module, heavy=HEAVY)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []", proc.stdout[-500:]


def test_entry_point_lists_and_dispatches_the_subcommands(tmp_path, capsys):
    proc = subprocess.run([entry_point(), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 0
    for sub in ("run", "tokenize", "train", "finetune", "eval"):
        assert re.search(rf"^\s+{sub}\s+\S", proc.stdout, re.M), f"{sub} not listed:\n{proc.stdout}"
    proc = subprocess.run([entry_point(), "nosuch"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    from pipeline import cli

    assert {sub: module for sub, (module, _) in cli.COMMANDS.items()} == {s: m for m, s in COMMANDS.values()}
    assert cli.main(["train", "--help-config", "--config", "smoke"]) == 0
    assert json.loads(reference_rows(capsys.readouterr().out)["model.n_layer"][1]) == 2
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'gpt2-pipeline = "pipeline.cli:main"' in pyproject


# one user error per command: (argv, what the message says)
USER_ERRORS = {
    "pipeline/run.py": (["train.lr=-1", "model.n_layer=0"], "train.lr: must be positive"),
    "tokenization/run.py": (["--config", "nosuch"], "preset 'nosuch' not found"),
    "train/run.py": (["--config", "smoke", "--data", "{tmp}/none"], "no manifest"),
    "train/finetune.py": (["--config", "smoke", "--ckpt", "{tmp}/none", "--task", "{tmp}/t.jsonl",
                           "tracking.enabled=false"], "{tmp}/none"),
    "eval/run.py": (["--config", "smoke", "--ckpt", "{tmp}/empty", "--no-val", "--hellaswag", "none"],
                    "unknown checkpoint layout"),
}


@pytest.mark.parametrize("script", COMMANDS)
def test_a_user_error_is_one_line_and_exit_code_2(script, tmp_path):
    (tmp_path / "empty").mkdir()
    argv, message = USER_ERRORS[script]
    argv = [a.format(tmp=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True,
                          cwd=tmp_path, timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": ""})
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message.format(tmp=tmp_path) in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    if script == "pipeline/run.py":  # two config errors, one line
        assert "model.n_layer: must be positive" in errors[0] and proc.stderr.count("\n") == 1


def test_every_user_fixable_error_is_a_user_error():
    from eval.generate import GenerationError
    from eval.hellaswag import HellaSwagError
    from pipeline.core.command import UserError
    from pipeline.core.config import ConfigError
    from pipeline.core.model.checkpoints import CheckpointError
    from pipeline.core.model.heads import HeadMismatch
    from pipeline.core.stage import StageError
    from pipeline.core.storage import StorageError
    from tokenization.shards import ShardError
    from tokenization.sources import CorpusError
    from tokenization.tokenizer import TokenizerUnavailable
    from train.diagnostics import OutOfMemory
    from train.launch import TrainingFailed
    from train.plan import PlanError
    from train.tasks import TaskError

    value_errors = (ConfigError, ShardError, CorpusError, CheckpointError, HeadMismatch, TaskError, PlanError,
                    HellaSwagError, GenerationError)
    runtime_errors = (StorageError, TokenizerUnavailable, TrainingFailed, StageError, OutOfMemory)
    for cls in value_errors + runtime_errors:
        assert issubclass(cls, UserError), cls
    assert all(issubclass(c, ValueError) for c in value_errors)  # callers still catch these as before
    assert all(issubclass(c, RuntimeError) for c in runtime_errors)
    # no command keeps its own list of error classes: the shell (pipeline.core.command) reports them all
    for script in COMMANDS:
        text = (REPO / script).read_text()
        assert "@command" in text and not re.search(r"except \(", text), script


def test_the_shell_reports_user_errors_in_one_line_and_exits_130_on_ctrl_c(capsys):
    from pipeline.core.command import UserError, command
    from pipeline.core.config import ConfigError

    @command
    def fails(argv):
        raise ConfigError("invalid config:\n  train.lr: must be positive\n  model.n_layer: must be positive")

    assert fails([]) == 2
    assert capsys.readouterr().err == "error: invalid config: train.lr: must be positive; model.n_layer: must be positive\n"

    @command
    def interrupted(argv):
        raise KeyboardInterrupt

    assert interrupted([]) == 130

    @command
    def bug(argv):
        raise ZeroDivisionError("a bug keeps its traceback")

    with pytest.raises(ZeroDivisionError):
        bug([])
    assert command(lambda argv: None)([]) == 0 and command(lambda argv: 3)([]) == 3
    assert issubclass(ConfigError, UserError)


def test_eval_input_errors_are_user_errors_naming_the_file(tmp_path, capsys):
    """What eval/run.py used to catch as a bare ValueError now raises a UserError at its source."""
    import eval.run
    from pipeline.core.model.gpt2 import GPT, GPTConfig, save_hf

    good = tmp_path / "good"
    save_hf(GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=50257)), good)
    bad_json, corrupt = tmp_path / "bad_json", tmp_path / "corrupt"
    for d in (bad_json, corrupt):
        shutil.copytree(good, d)
    (bad_json / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes(b"garbage")
    base = ["--config", "smoke", "--no-val", "--hellaswag", "none"]
    cases = [(["--ckpt", str(bad_json)], f"{bad_json / 'config.json'}: not a readable JSON file"),
             (["--ckpt", str(corrupt)], f"{corrupt / 'model.safetensors'}: not readable weights"),
             (["--ckpt", str(good), "--prompt", ""], "eval.prompts (--prompt): a prompt is empty"),
             (["--ckpt", str(good), "--prompt", "word " * 40], "leaves no room for new tokens in the model's context of 16")]
    for argv, message in cases:
        assert eval.run.main([*base, *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and message in err, (argv, err)
    assert eval.run.main([*base, "--ckpt", str(good), "--prompt", "Hello"]) == 0


def test_val_split_shorter_than_a_sequence_is_a_shard_error(tmp_path):
    import json

    import numpy as np

    from eval import val_loss
    from tokenization import shards

    digest = shards.write_shard(str(tmp_path / "val_000000.bin"), [np.arange(10, dtype=np.uint16)], 10)
    (tmp_path / shards.MANIFEST).write_text(json.dumps({"format_version": shards.MANIFEST_VERSION, "shards": [
        {"file": "val_000000.bin", "split": "val", "tokens": 10, "documents": 1, "sha256": digest}]}))
    with pytest.raises(shards.ShardError, match=r"val split \(10 tokens\) is shorter than one sequence of 64 "
                                                r"\(batch.seq_len\)"):
        val_loss.val_sequences(str(tmp_path), 64, 4096)


def test_metric_names_have_one_owner():
    from eval import hellaswag
    from pipeline import register

    assert register.SCORE == hellaswag.ACC_NORM == "hellaswag/harness/acc_norm"
    assert set(hellaswag.METRICS) == {"hellaswag/harness/acc", "hellaswag/harness/acc_norm",
                                      "hellaswag/completion/acc", "hellaswag/completion/acc_norm"}
    # the driver's report and the tracking code repeat no HellaSwag metric name
    for path in ("pipeline/run.py", "pipeline/register.py", "pipeline/core/registry.py", "pipeline/core/tracking.py"):
        assert not re.search(r"[\"']hellaswag/(harness|completion)/", (REPO / path).read_text()), path
