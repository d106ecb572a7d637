"""The pipeline: corpus -> shards -> trainer -> checkpoint -> eval -> registered model, one MLflow lineage.

    python pipeline/run.py [--config PRESET] [--stages tokenize,train,eval,register[,finetune]] [--force STAGE]... [--plan]
                           [section.key=value ...]
    ray job submit --working-dir . -- python pipeline/run.py --config gpt2-124m

With no arguments: the `smoke` preset on the built-in corpus, a local Ray, MLflow in ./mlflow.db.
The optional `finetune` stage puts task heads on the final checkpoint (finetune.* in the config).
Under `ray job submit` it joins the cluster ($RAY_ADDRESS). Every stage skips what is complete, so
submitting the same run name again continues: tokenization is reused, training resumes.
"""

from __future__ import annotations

import os
import sys
import time

from pipeline.core.command import UserError, command
from pipeline.core.config import (
    HOME_ENV,
    CommandParser,
    help_config,
    in_ray_package_cache,
    load_config,
    output_base,
    preset_in_force,
)
from pipeline.core.progress import format_duration

EMBEDDED = "smoke"  # what `python pipeline/run.py` runs with no arguments
# The stages, by name: pipeline/stages.py's table defines them (tests/test_stages.py checks that the names
# agree); named here so that --help imports no stage (torch, Ray, MLflow).
STAGES = ("tokenize", "train", "eval", "register")
OPTIONAL = ("finetune",)


@command
def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="pipeline/run.py", description=__doc__,
                           preset_help=f"preset name or YAML path (default: {EMBEDDED}: the built-in corpus, "
                                       "CPU-sized; a stage's own command defaults to production sizes)")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated stages to run, in order (optional: {', '.join(OPTIONAL)})")
    parser.add_argument("--force", action="append", default=[], choices=[*STAGES, *OPTIONAL], metavar="STAGE",
                        help="redo this stage even if it is complete (repeatable)")
    parser.add_argument("--plan", action="store_true",
                        help="print the training memory and cost plan (no Ray, no model); exit 2 if it does not fit")
    parser.add_overrides()
    args = parser.parse_args(argv)
    selected = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in selected if s not in (*STAGES, *OPTIONAL)]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; stages: {', '.join((*STAGES, *OPTIONAL))}")
    preset = preset_in_force(args.config, EMBEDDED)
    cfg = load_config(preset, args.overrides).with_absolute_paths()
    if help_config(args, cfg):
        return 0
    if args.plan:
        from train import plan

        print(plan.check(cfg, preset).report(preset))
        return 0
    return run(cfg, selected, set(args.force))


def run(cfg, selected: list[str], force: set[str]) -> int:
    # the heavy parts (Ray, MLflow, torch), once the arguments are parsed
    from pipeline.core import cluster, lineage, runlock, storage
    from pipeline.core.redaction import redact

    started = time.time()
    if in_ray_package_cache():  # see README, "Run it on a cluster": outputs must outlive Ray's copy of the checkout
        os.makedirs(output_base(), exist_ok=True)
        print(f"pipeline: running in Ray's copy of the working directory ({os.getcwd()}), which Ray deletes; "
              f"relative outputs go to {output_base()} "
              f"(${HOME_ENV} sets it): run directory {cfg.run_dir}, MLflow "
              f"{redact(lineage.tracking_uri(cfg.tracking.uri, output_base()))}", flush=True)
    # storage, tracking and cluster that cannot work are refused before any work, with one line (a UserError):
    # a tracking server that answers and refuses us (login, permission, Host name) raises TrackingRefused; one
    # that cannot be reached is only warned about, and training goes on
    storage.configure(cfg.storage.retry_s, cfg.storage.timeout_s)
    for url in dict.fromkeys((cfg.run_dir, cfg.data_dir, cfg.checkpoint_dir)):
        storage.check(url)
    uri = lineage.tracking_uri(cfg.tracking.uri, output_base())
    track = lineage.Lineage(uri, cfg.tracking.experiment, cfg.run_dir) if cfg.tracking.enabled else None
    connecting = time.time()
    cluster.connect(cfg)  # also refuses a run dir the nodes do not share
    ray_start = time.time() - connecting
    with runlock.hold(cfg.run_dir, cfg.run.lock_lease_s):  # one run at a time on a run directory
        return _run(cfg, selected, force, started, track, ray_start)


def _run(cfg, selected: list[str], force: set[str], started: float, track, ray_start: float) -> int:
    import ray

    from pipeline import stages
    from pipeline.core import lineage
    from pipeline.core.redaction import redact

    tags = {"git_commit": lineage.git_commit(), "ray_cluster_resources": ray.cluster_resources(),
            "run_dir": redact(cfg.run_dir), **{f"version.{k}": v for k, v in lineage.package_versions().items()}}
    parent = track.start_parent(cfg.run.name, cfg.flat(), tags) if track else None
    print(f"pipeline: run '{cfg.run.name}' in {cfg.run_dir}; stages {', '.join(selected)}; tracking "
          f"{redact(track.uri) if track and track.available else 'off'}", flush=True)
    ctx = stages.Context(cfg, track)
    try:
        for name in selected:
            result = stages.run_stage(ctx, stages.ALL[name], name in force).result
            if track:  # what the stage says the pipeline's run should carry
                track.set_tags(parent, result.parent_tags)
                track.log_metrics(parent, result.summary, result.step)
    except KeyboardInterrupt:
        print("pipeline: interrupted; run the same command again to continue", file=sys.stderr)
        if track:
            track.finish(parent, "KILLED")
        return 130
    except UserError:  # one line, exit 2 (the command shell); the run is marked failed
        if track:
            track.finish(parent, "FAILED")
        raise
    except Exception as err:  # every stage error is reported the same way: what failed, and how to resume
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        print("pipeline: stopped; fix the cause and run the same command again to continue", file=sys.stderr)
        if track:
            track.finish(parent, "FAILED")
        return 1
    seconds = timings(ctx, ray_start, track, time.time() - started)
    if track:
        track.log_metrics(parent, {f"pipeline/seconds/{k}": v for k, v in seconds.items()})
        track.finish(parent)
    report(ctx, track, parent, seconds)
    return 0


def timings(ctx, ray_start: float, track, total: float) -> dict[str, float]:
    """Where the driver's wall time went: each stage's own work, and the orchestration around it (Ray start,
    the MLflow calls that are no stage's work, and the bookkeeping left over)."""
    from pipeline import stages

    ran = {name: o for name, o in ctx.outcomes.items() if not o.skipped}
    work = {name: o.work_seconds for name, o in ran.items()}
    tracking_work = sum(o.tracking_seconds for name, o in ran.items() if stages.ALL[name].tracking_is_work)
    mlflow = (track.seconds if track else 0.0) - tracking_work
    out = {**work, "ray_start": ray_start, "mlflow": mlflow}
    out["bookkeeping"] = max(0.0, total - sum(out.values()))
    out["total"] = total
    return out


def report(ctx, track, parent: str | None, seconds: dict[str, float]) -> None:
    from eval.hellaswag import METRICS as HELLASWAG
    from eval.references import hellaswag_label
    from eval.stage import FINAL
    from eval.val_loss import VAL_LOSS
    from pipeline.core.lineage import VIEW_HINT, ui_command

    print(f"\npipeline: done in {format_duration(seconds['total'])}")
    for name, outcome in ctx.outcomes.items():
        status = "skipped (complete)" if outcome.skipped else f"{seconds[name]:.0f} s"
        print(f"  {name:<9} {status:<20} {outcome.result.output or ''}")
    overhead = seconds["ray_start"] + seconds["mlflow"] + seconds["bookkeeping"]
    print(f"  overhead  {overhead:.0f} s ({overhead / seconds['total']:.0%}): Ray start {seconds['ray_start']:.0f} s, "
          f"MLflow {seconds['mlflow']:.0f} s, bookkeeping {seconds['bookkeeping']:.0f} s")
    scores = {}
    if "eval" in ctx.outcomes:
        final = ctx.outcomes["eval"].result.metrics
        scores.update({k: final[FINAL + k] for k in (VAL_LOSS, *HELLASWAG) if FINAL + k in final})
        if ctx.cfg.eval.hellaswag and any(k in scores for k in HELLASWAG):
            print(f"  {'hellaswag/*':<30} on {hellaswag_label(ctx.cfg.eval.hellaswag)}")
    if "finetune" in ctx.outcomes:
        scores.update(ctx.outcomes["finetune"].result.metrics)  # held-out task scores
    for key, value in scores.items():
        print(f"  {key:<30} {value:.4f}")
    if track and track.available:
        print(f"\nReview it in MLflow:\n  {ui_command(track.uri)}")
        if parent:
            print(f"  then open {track.run_url(parent)}")
        registered = ctx.outcomes["register"].result.details if "register" in ctx.outcomes else {}
        if registered.get("version"):
            print(f"  model card: {track.version_url(registered['name'], registered['version'])}")
        print(f"  ({VIEW_HINT})")


if __name__ == "__main__":
    sys.exit(main())
