"""Writing checkpoints: everything a run needs to continue exactly, committed atomically, and reading
the DeepSpeed state back into an engine. The layout and the reading of committed checkpoints are
pipeline/core/model/checkpoints.py's, shared with eval and fine-tuning.

Works on local disk, a shared filesystem or object storage (fsspec URLs): every rank stages its
DeepSpeed files on local disk and uploads them. A reader trusts only committed checkpoints, so a crash
while writing leaves the previous one as `latest`. Resuming with another number of workers goes
through DeepSpeed's universal checkpoint, converted once and kept beside the original.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

import torch

from pipeline.core import storage
from pipeline.core.model.checkpoints import (
    DS_TAG,
    LATEST,
    STATE,
    UNIVERSAL_TAG,
    CheckpointError,
    TrainerState,
    committed,
    damage,
    finite,
    is_step_name,
    step_name,
)
from pipeline.core.model.gpt2 import save_hf
from pipeline.core.storage import join

# --- saving ---------------------------------------------------------------------------------------

def save(engine, model: torch.nn.Module, directory: str, state: TrainerState, keep_last: int,
         before_commit: Callable[[], None] | None = None) -> str:
    """Write a checkpoint on every rank and commit it on rank 0. Collective: all ranks call it.
    before_commit: run by rank 0 just before the commit (e.g. copy the metrics up to this step to the run
    dir: a crash right after the commit resumes past those steps, so they must already be there)."""
    import torch.distributed as dist
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    url = join(directory, step_name(state.step))
    if rank == 0 and storage.exists(url):  # debris of a crash at this very step
        storage.remove(url, recursive=True)
    dist.barrier()
    staged = _staged(url)
    with staged as local, _disk_full_named(local):
        engine.save_checkpoint(os.path.join(local, "deepspeed"), tag=DS_TAG, save_latest=False, client_state={
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        weights = full_state_dict(engine, model, keep=rank == 0)  # collective; only rank 0 keeps a copy
        if rank == 0:
            if hasattr(model, "hf_files"):  # a model with task heads (pipeline/core/model/heads.py) writes its own layout
                model.save_hf(local, state=weights)
            else:
                save_hf(model, local, state=weights)
    dist.barrier()  # every rank's files are in place
    record = _record(url, staged.files, rank, world)
    if rank == 0:
        _check_uploaded(url, record)
        if before_commit is not None:
            before_commit()
        storage.write_json(join(url, STATE), {**asdict(state), "saved_at": time.time(), "files": record})
        storage.write_bytes(join(directory, LATEST), step_name(state.step).encode())
        _prune(directory, keep_last)
    dist.barrier()
    return url


def full_state_dict(engine, model: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """fp32 master weights, whole, on CPU. Collective under ZeRO (every rank takes part in assembling
    each parameter from the partitions, one parameter at a time); only where keep is set are they
    copied to the CPU and returned: the other ranks return {} (a 1.5B model is 6.2 GB per copy)."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p) if engine.zero_optimization_stage() > 0 else None
        if keep:
            out[name] = (full if full is not None else p).detach().float().cpu().clone()
        del full  # the device copy of this one parameter goes now, not at the end
    if "transformer.wte.weight" in out:  # a bare GPT: its tied head (a task model's trunk is prefixed)
        out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def _record(url: str, staged: dict[str, dict] | None, rank: int, world: int) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file of the checkpoint, for its commit (collective). Staged
    for object storage, each rank hashed its own files before uploading them; written in place (local disk,
    a shared filesystem), the files rank 0 lists are hashed by all ranks, a share each."""
    import torch.distributed as dist

    if staged is None:
        names = [sorted(storage.files(url)) if rank == 0 else None]
        dist.broadcast_object_list(names, src=0)
        staged = {name: {"size": storage.size(join(url, name)), "sha256": storage.sha256(join(url, name))}
                  for name in names[0][rank::world]}
    shares = [None] * world if rank == 0 else None
    dist.gather_object(staged, shares, dst=0)
    return {name: entry for share in shares or [] for name, entry in share.items()}


def _check_uploaded(url: str, record: dict[str, dict]) -> None:
    """Refuse to commit a checkpoint whose files are not all there with the sizes written."""
    present = storage.files(url)
    for name, entry in sorted(record.items()):
        if present.get(name) != entry["size"]:
            raise CheckpointError(f"{join(url, name)}: {present.get(name, 'no')} bytes on storage after the "
                                  f"upload, {entry['size']} written; the checkpoint is not committed")


@contextmanager
def _disk_full_named(path: str) -> Iterator[None]:
    """A full disk while writing the checkpoint's files is one line naming where (DeepSpeed's writes bury it)."""
    try:
        yield
    except OSError as err:
        raise storage.disk_full(err, path) or err
    except RuntimeError as err:  # torch.save reports a failed write as a RuntimeError without the errno
        if shutil.disk_usage(path).free < 16 << 20:
            raise storage.disk_full(OSError(errno.ENOSPC, str(err)), path) from err
        raise


class _staged:
    """A local directory whose files end up under url: url itself when local, else a temp dir uploaded
    on exit (every rank uploads its own files). `files`: what was uploaded, {relative path: {"size",
    "sha256"}}, hashed from the local copies; None when url is local (nothing was staged)."""

    def __init__(self, url: str):
        self.url, self.local = url, storage.is_local(url)
        self.files: dict[str, dict] | None = None

    def __enter__(self) -> str:
        self.path = storage.filesystem(self.url)[1] if self.local else tempfile.mkdtemp(prefix="ckpt-")
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def __exit__(self, kind, *_) -> None:
        if self.local:
            return
        try:
            if kind is None:
                self.files = {}
                for root, _, names in os.walk(self.path):
                    for name in names:
                        path = os.path.join(root, name)
                        self.files[os.path.relpath(path, self.path).replace(os.sep, "/")] = {
                            "size": os.path.getsize(path), "sha256": storage.sha256(path)}
                storage.upload(self.path, self.url)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)


def _prune(directory: str, keep_last: int) -> None:
    names = committed(directory)
    # kept whatever keep_last says: the newest a run of bad steps may go back to (by its recorded loss alone:
    # verifying its files here would read the newest checkpoint back at every save)
    kept = finite(directory)[-1:]
    for name in names[:-keep_last]:
        if name in kept:
            continue
        storage.remove(join(directory, name), recursive=True)
    newest = names[-1]
    for name in storage.listdir(directory):  # uncommitted leftovers of crashed saves
        if is_step_name(name) and name not in names and name < newest:
            storage.remove(join(directory, name), recursive=True)


# --- loading --------------------------------------------------------------------------------------

def newest_intact(directory: str, rank: int = 0, world: int = 1, say: Callable[[str], None] = print,
                  before: int | None = None) -> str | None:
    """URL of the newest committed checkpoint whose files all match their commit (checkpoints.damage), or
    None when there is no candidate; each damaged one passed over is said in one line. The candidates: every
    committed checkpoint (resume), or, going back from bad steps that began at step `before`, those of earlier
    steps whose recorded loss was finite (checkpoints.finite). With world > 1 it is collective and one
    decision for all ranks: rank 0 lists the candidates, each rank hashes a share of a candidate's files, and
    every rank sees every rank's verdict. Raises CheckpointError when there are candidates but none is intact
    (starting afresh, or going back further, would silently throw the run away)."""
    import torch.distributed as dist

    names = [(committed(directory) if before is None else finite(directory, before)) if rank == 0 else None]
    if world > 1:
        dist.broadcast_object_list(names, src=0)
    damaged: list[str] = []
    for name in reversed(names[0]):
        url = join(directory, name)
        mine = damage(url, hashed=lambda files: files[rank::world])
        verdicts = [mine]
        if world > 1:
            verdicts = [None] * world
            dist.all_gather_object(verdicts, mine)
        problem = next((v for v in verdicts if v), None)
        if problem is None:
            if damaged:
                say(f"{len(damaged)} damaged checkpoint(s) passed over; using {url}, the newest that verifies")
            return url
        say(f"{name} is damaged and is not used: {problem}")
        damaged.append(problem)
    if damaged:
        which = "committed checkpoint" if before is None else f"checkpoint before step {before} with a finite loss"
        raise CheckpointError(f"{directory}: no {which} verifies; the newest: {damaged[0]}")
    return None


def prepare_universal(url: str) -> None:
    """Convert a checkpoint's DeepSpeed state to a universal checkpoint once, beside it
    (deepspeed/universal/, committed by deepspeed/universal.json). Run outside the training collectives:
    the launcher calls it in a Ray task before the workers start."""
    from deepspeed.checkpoint import ds_to_universal

    marker = join(url, "deepspeed", f"{UNIVERSAL_TAG}.json")
    if storage.exists(marker):
        return
    target = join(url, "deepspeed", UNIVERSAL_TAG)
    storage.remove(target, recursive=True)  # debris of a conversion cut short
    with _staged(target) as out:
        source = storage.local_copy(join(url, "deepspeed"), lambda name: name.startswith(f"{DS_TAG}/"))
        ds_to_universal.main(argparse.Namespace(
            input_folder=os.path.join(source, DS_TAG), output_folder=out, num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=False))
    storage.write_json(marker, {"source": DS_TAG, "world_size": TrainerState.read(url).world_size})


def load(engine, url: str, state: TrainerState, world_size: int) -> None:
    """Restore the DeepSpeed state of the checkpoint at url into engine (all ranks): this rank's own
    files, or the universal checkpoint (prepare_universal) when the number of workers changed."""
    rank = engine.global_rank
    if state.world_size == world_size:
        tag = DS_TAG
        mine = re.compile(rf"^{DS_TAG}/(mp_rank_\d+_model_states\.pt|zero_pp_rank_{rank}_.*)$")
    else:
        tag = UNIVERSAL_TAG
        if not storage.exists(join(url, "deepspeed", f"{UNIVERSAL_TAG}.json")):
            raise CheckpointError(f"{url} was written by {state.world_size} workers and has no universal "
                                  f"checkpoint for {world_size}; prepare_universal converts it")
        mine = re.compile(rf"^{UNIVERSAL_TAG}/")
    # DeepSpeed reads <load_dir>/<tag>/: the local folder that holds the tag folder
    load_dir = storage.local_copy(join(url, "deepspeed"), lambda name: bool(mine.search(name)))
    where = join(url, "deepspeed", tag)
    if not os.path.isdir(os.path.join(load_dir, tag)) or not os.listdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{where}: no DeepSpeed state for rank {rank} in this checkpoint")
    try:
        loaded, _ = engine.load_checkpoint(load_dir, tag=tag, load_lr_scheduler_states=False)
    except (AssertionError, FileNotFoundError) as err:
        raise CheckpointError(f"{where}: DeepSpeed could not load it ({err})") from err
    if loaded is None:
        raise CheckpointError(f"{where}: DeepSpeed loaded nothing from it")
