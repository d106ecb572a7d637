"""The driver's one way to run a stage: skip what is complete and verified, redo what changed, record results."""

from __future__ import annotations

from pipeline import stages
from pipeline.core.config import load_config
from pipeline.core.stage import Stage, StageResult


class FakeStage:
    """A stage whose inputs and output check the test sets, counting its runs."""

    def __init__(self, name: str = "fake"):
        self.inputs, self.whole, self.runs, self.seen_force = {"setting": 1}, True, 0, []
        self.stage = Stage(name, lambda cfg, up: dict(self.inputs), lambda cfg, result, tracking: self.whole, self.run)

    def run(self, cfg, force, tracking, upstream) -> StageResult:
        self.runs += 1
        self.seen_force.append(force)
        return StageResult(output=f"{cfg.run_dir}/out-{self.runs}", metrics={"fake/value": float(self.runs)},
                           details={"run": self.runs})


def context(tmp_path):
    cfg = load_config("smoke", ["tracking.enabled=false", f"run.root={tmp_path}"]).with_absolute_paths()
    return stages.Context(cfg, lineage=None, log=lambda line: None)


def test_a_stage_is_skipped_while_its_fingerprint_matches_and_its_output_verifies(tmp_path):
    fake = FakeStage()
    first = stages.run_stage(context(tmp_path), fake.stage, force=False)
    assert not first.skipped and fake.runs == 1 and first.result.output.endswith("out-1")
    marker = stages.read_marker(context(tmp_path).cfg, "fake")
    assert marker["result"]["details"] == {"run": 1} and len(marker["fingerprint"]) == 64

    again = stages.run_stage(context(tmp_path), fake.stage, force=False)  # a new driver, same run dir
    assert again.skipped and fake.runs == 1
    assert again.result == first.result  # the recorded result, typed, as the stage returned it


def test_changed_inputs_a_broken_output_or_force_redo_the_stage(tmp_path):
    fake = FakeStage()
    stages.run_stage(context(tmp_path), fake.stage, force=False)
    fake.inputs["setting"] = 2  # what the output depends on changed
    assert not stages.run_stage(context(tmp_path), fake.stage, force=False).skipped and fake.runs == 2
    assert stages.run_stage(context(tmp_path), fake.stage, force=False).skipped and fake.runs == 2
    fake.whole = False  # the recorded output no longer verifies (deleted, truncated)
    assert not stages.run_stage(context(tmp_path), fake.stage, force=False).skipped and fake.runs == 3
    fake.whole = True
    forced = stages.run_stage(context(tmp_path), fake.stage, force=True)
    assert not forced.skipped and fake.runs == 4 and fake.seen_force == [False, False, False, True]
    assert stages.read_marker(context(tmp_path).cfg, "fake")["result"]["details"] == {"run": 4}


def test_a_later_stage_reads_an_earlier_ones_result_from_this_run_or_from_its_marker(tmp_path):
    early, late = FakeStage("early"), FakeStage("late")
    late.stage = Stage("late", lambda cfg, up: up("early").output, lambda cfg, result, tracking: True, late.run)
    stages.run_stage(context(tmp_path), early.stage, force=False)
    stages.run_stage(context(tmp_path), late.stage, force=False)
    # a driver that runs only the late stage still sees the early one's recorded output
    ctx = context(tmp_path)
    assert ctx.upstream("early").output.endswith("out-1") and ctx.upstream("missing") is None
    assert stages.run_stage(ctx, late.stage, force=False).skipped
    stages.run_stage(context(tmp_path), early.stage, force=True)  # a new early output: the late stage is stale
    assert not stages.run_stage(context(tmp_path), late.stage, force=False).skipped and late.runs == 2


def test_a_failing_stage_records_nothing(tmp_path):
    def boom(cfg, force, tracking, upstream):
        raise RuntimeError("boom")

    stage = Stage("fails", lambda cfg, up: 1, lambda cfg, result, tracking: True, boom)
    try:
        stages.run_stage(context(tmp_path), stage, force=False)
    except RuntimeError:
        pass
    assert stages.read_marker(context(tmp_path).cfg, "fails") is None


def test_the_pipeline_table_names_every_stage_once_and_the_command_knows_them():
    import pipeline.run

    assert list(stages.ALL) == ["tokenize", "train", "eval", "register", "finetune"]
    assert [*pipeline.run.STAGES, *pipeline.run.OPTIONAL] == list(stages.ALL)  # --help names them without importing it
