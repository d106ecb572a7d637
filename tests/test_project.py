"""The project's shape: importable packages, no shadowed standard-library names, the documented commands."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

import pytest
from conftest import REPO, run_cli

STAGES = ("pipeline", "tokenization", "train", "eval")


def test_no_module_of_the_project_shadows_the_standard_library():
    top = {p.stem for p in REPO.iterdir() if (p.is_dir() and not p.name.startswith(".")) or p.suffix == ".py"}
    assert set(STAGES) <= top
    clash = top & set(sys.stdlib_module_names)
    assert not clash, f"top-level names that hide standard-library modules: {clash}"
    # `python eval/run.py` puts eval/ first on sys.path, so what sits inside a stage folder (its modules and
    # sub-packages, e.g. pipeline/core) is top-level too
    inner = {p.stem for stage in STAGES for p in (REPO / stage).rglob("*") if p.suffix == ".py" or p.is_dir()}
    assert not inner & set(sys.stdlib_module_names), inner & set(sys.stdlib_module_names)


def test_packages_import_from_anywhere(tmp_path):
    code = "import pipeline.core.config, tokenization.job, train, eval; print(pipeline.core.config.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith(str(REPO))
    assert "usage" in run_cli(str(REPO / "tokenization" / "run.py"), "--help", cwd=tmp_path).stdout


def test_stage_commands_without_a_preset_say_they_run_production_defaults(tmp_path, capsys):
    import eval.run
    import pipeline.run
    import train.finetune
    import train.run
    from pipeline.core.config import load_config

    assert load_config().model.n_layer == load_config("gpt2-124m").model.n_layer != load_config("smoke").model.n_layer
    first = "config: preset 'base' (production defaults; no --config given)"
    assert train.run.main(["--data", str(tmp_path / "none")]) == 2
    out = capsys.readouterr()
    assert out.out.splitlines()[0] == first and "no manifest" in out.err
    assert eval.run.main(["--ckpt", str(tmp_path)]) == 2 and capsys.readouterr().out.splitlines()[0] == first
    assert train.finetune.main(["--ckpt", str(tmp_path / "none"), "tracking.enabled=false"]) == 2
    assert capsys.readouterr().out.splitlines()[0] == first
    assert train.run.main(["--config", "smoke", "--data", str(tmp_path / "none")]) == 2
    assert capsys.readouterr().out.splitlines()[0] == "config: preset 'smoke'"
    for main, default in ((train.run.main, "base"), (eval.run.main, "base"), (train.finetune.main, "base"),
                          (pipeline.run.main, "smoke")):
        with pytest.raises(SystemExit):
            main(["--help"])
        assert f"default: {default}" in " ".join(capsys.readouterr().out.split())


def test_a_ray_task_with_the_repo_as_working_dir_imports_torch(tmp_path):
    # Ray puts the working dir first on every worker's sys.path: a top-level package named like a
    # standard-library module (tokenize/, say) would break `import torch` right here.
    script = tmp_path / "probe.py"
    script.write_text(f"""
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, runtime_env={{"working_dir": {str(REPO)!r}}})

@ray.remote
def probe():
    import os, tokenize, torch, tokenization.job
    return torch.__version__, os.getcwd(), tokenization.job.__file__, tokenize.__file__

print("RESULT", *ray.get(probe.remote()))
""")
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    version, cwd, ours, tokenize_module = out.stdout.split("RESULT ")[1].split()
    assert version.startswith("2.") and "working_dir_files" in cwd
    assert ours.startswith(cwd)  # our packages come from the uploaded working dir
    assert tokenize_module.startswith(sys.base_prefix)  # the standard library's, not shadowed


def our_imports() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in the file, lazy imports included)."""
    graph = {}
    for stage in STAGES:
        for path in (REPO / stage).rglob("*.py"):
            found = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                found |= {n for n in names if n.split(".")[0] in STAGES and (REPO / (n.replace(".", "/") + ".py")).exists()}
            module = ".".join(path.relative_to(REPO).with_suffix("").parts)
            graph[module] = found - {module}
    return graph


def test_imports_flow_one_way():
    graph = our_imports()
    core = {m for m in graph if m.startswith("pipeline.core.")}
    assert {"pipeline.core.config", "pipeline.core.storage", "pipeline.core.tracking", "pipeline.core.model.gpt2"} <= core
    # the foundation imports nothing of ours but itself; outside pipeline/, only the foundation is imported
    for module in core:
        assert graph[module] <= core, (module, graph[module] - core)
    for module, deps in graph.items():
        if not module.startswith("pipeline."):
            assert not {d for d in deps if d.startswith("pipeline.") and d not in core}, (module, deps)
    # the stages and the model family they share import each other in one direction only
    groups = {"pipeline.core.model": "model", "tokenization": "tokenization", "train": "train", "eval": "eval"}

    def group(module: str) -> str | None:
        return next((g for prefix, g in groups.items() if module == prefix or module.startswith(prefix + ".")), None)

    edges = {(group(m), group(d)) for m, deps in graph.items() for d in deps
             if group(m) and group(d) and group(m) != group(d)}
    assert not {(a, b) for a, b in edges if (b, a) in edges}, edges
    assert {b for a, b in edges if a == "model"} == set(), "the model family imports no stage"
    # the model is one file with no distributed machinery
    model = (REPO / "pipeline" / "core" / "model" / "gpt2.py").read_text()
    assert not re.search(r"^\s*(import|from) (deepspeed|ray|torch\.distributed)", model, re.M)
    # and no cycles among modules
    state: dict[str, int] = {}

    def visit(module, path):
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [module])}")
        if state.get(module) != 2:
            state[module] = 1
            for dep in graph.get(module, ()):
                visit(dep, path + [module])
            state[module] = 2

    for module in graph:
        visit(module, [])


def test_ci_runs_the_test_command_written_in_the_readme():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    setup = [b.strip() for b in blocks if "python3.11 -m venv" in b]
    assert len(setup) == 2, "README gives exactly two set-up commands"
    run_command, test_command = setup
    assert "pipeline/run.py" in run_command and "pytest" in test_command
    assert test_command in (REPO / ".ci" / "run").read_text()
