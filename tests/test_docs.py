"""Every `python .../run.py ...` (and `train/finetune.py`) command in the user-facing documents gets past its CLI's argument
parser and the config loader (preset, overrides, cross-field checks), so a documented command cannot
be one that fails before doing any work."""

from __future__ import annotations

import importlib
import re
import shlex

import pytest
from conftest import REPO

DOCS = ("README.md", "BENCHMARKS.md", "infra/README.md")
_COMMAND = re.compile(r"python[0-9.]*\s+((?:pipeline|train|tokenization|eval)/run\.py|train/finetune\.py)\b(.*)")


def snippets(text: str) -> list[str]:
    """Code in a Markdown text: each line of a fenced block (continuation lines joined) and each inline
    code span (which may wrap onto the next line)."""
    out, prose = [], []
    for i, part in enumerate(re.split(r"^\s*```.*$", text, flags=re.M)):
        if i % 2:  # inside a fence
            out += part.replace("\\\n", " ").splitlines()
        else:
            prose.append(part)
    out += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", "\n".join(prose))]
    return out


def documented_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for doc in DOCS:
        for snippet in snippets((REPO / doc).read_text()):
            match = _COMMAND.search(snippet)
            if match:
                rest = re.split(r"\s(?:#|&&|\||;)", match.group(2))[0]  # up to a comment or the next command
                found.append((doc, match.group(1), shlex.split(rest)))
    return found


class Loaded(Exception):
    """Raised in place of the stage's work once the config has loaded."""


COMMANDS = documented_commands()


def test_the_documents_have_the_commands_we_expect_to_check():
    scripts = {script for _, script, _ in COMMANDS}
    assert scripts == {"pipeline/run.py", "train/run.py", "tokenization/run.py", "eval/run.py", "train/finetune.py"}
    assert len(COMMANDS) >= 15
    assert any(doc == "BENCHMARKS.md" and script == "train/run.py" for doc, script, _ in COMMANDS)
    assert any(doc == "infra/README.md" for doc, _, _ in COMMANDS)


@pytest.mark.parametrize("doc, script, argv", COMMANDS, ids=[f"{d}:{' '.join([s, *a])}" for d, s, a in COMMANDS])
def test_documented_command_gets_through_the_config_loader(doc, script, argv, monkeypatch, capsys):
    cli = importlib.import_module(script[:-3].replace("/", "."))
    real = cli.load_config

    def load_and_stop(*args, **kwargs):
        raise Loaded(real(*args, **kwargs))  # a ConfigError propagates to the CLI, which reports it

    monkeypatch.setattr(cli, "load_config", load_and_stop)
    if argv[:1] == ["verify"]:  # the one subcommand without a config: it must still parse
        monkeypatch.setattr(cli.job, "verify", lambda dataset: (_ for _ in ()).throw(Loaded(dataset)))
    with pytest.raises(Loaded):
        code = cli.main(argv)
        pytest.fail(f"{doc}: `python {script} {shlex.join(argv)}` exited {code}: {capsys.readouterr().err}")
