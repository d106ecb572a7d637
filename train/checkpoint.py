"""Checkpoints: everything a run needs to continue exactly, committed atomically.

    <checkpoint dir>/
      step_00000100/
        deepspeed/state/       every rank's DeepSpeed state (weights, ZeRO optimizer partitions)
        model.safetensors      consolidated fp32 weights under GPT-2's Hugging Face names
        config.json            so `transformers` opens the directory as GPT2LMHeadModel
        trainer_state.json     written last, by rank 0: its presence commits the checkpoint
      latest                   the newest committed checkpoint's name, updated after the commit

Works on local disk, a shared filesystem or object storage (fsspec URLs): every rank stages its
DeepSpeed files on local disk and uploads them. A reader trusts only committed checkpoints, so a crash
while writing leaves the previous one as `latest`. Resuming with another number of workers goes
through DeepSpeed's universal checkpoint, converted once and kept beside the original.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from pipeline.core import storage
from pipeline.core.command import UserError
from pipeline.core.storage import join
from train.model import save_hf

STATE = "trainer_state.json"
LATEST = "latest"
DS_TAG = "state"
UNIVERSAL_TAG = "universal"
_NAME = re.compile(r"^step_(\d{8})$")


class CheckpointError(UserError, ValueError):
    """A checkpoint that is missing, incomplete or does not fit; the message names the path."""


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken
    sequences: int = 0  # data position: global sequences consumed by all workers together
    tokens: int = 0
    world_size: int = 1
    zero_stage: int = 0
    manifest_sha256: str = ""  # the dataset the run trains on
    data_order: str = ""  # train/data.py's ORDER; "" in checkpoints written before it was recorded
    run_id: str | None = None  # the tracking (MLflow) run
    loss: float | None = None  # training loss of the last step

    @classmethod
    def read(cls, url: str) -> TrainerState:
        data = storage.read_json(join(url, STATE))
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def forbid_unpickling(deepspeed_records: bool = True) -> None:
    """Make every torch.load in this process weights_only, DeepSpeed's included.

    DeepSpeed's state files hold tensors, dicts and three plain DeepSpeed records; with
    deepspeed_records those are allowlisted (importing DeepSpeed), and nothing else in a checkpoint
    can run code when it is read.
    """
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    if deepspeed_records:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        torch.serialization.add_safe_globals([LossScaler, ZeroStageEnum, fragment_address])


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def is_step_name(name: str) -> bool:
    """Whether `name` is a checkpoint's directory name (step_NNNNNNNN)."""
    return bool(_NAME.match(name))


def committed(directory: str) -> list[str]:
    """Names of the committed checkpoints in a checkpoint directory, oldest first."""
    names = [n for n in storage.listdir(directory) if is_step_name(n)]
    return [n for n in names if storage.exists(join(directory, n, STATE))]


def latest(directory: str) -> str | None:
    """URL of the newest committed checkpoint. The commit markers decide, not the `latest` pointer
    (kept for people and tools): a crash between a commit and the pointer update loses nothing."""
    names = committed(directory)
    return join(directory, names[-1]) if names else None


def resolve(path: str) -> str:
    """A checkpoint given by the user: a checkpoint directory (its latest) or one checkpoint."""
    if storage.exists(join(path, STATE)):
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path}: no committed checkpoint here (expected {STATE} in it, "
                              f"or step_NNNNNNNN/{STATE} below it)")
    return found


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

    rank = dist.get_rank()
    url = join(directory, step_name(state.step))
    if rank == 0 and storage.exists(url):  # debris of a crash at this very step
        storage.remove(url, recursive=True)
    dist.barrier()
    with _staged(url) as local:
        engine.save_checkpoint(os.path.join(local, "deepspeed"), tag=DS_TAG, save_latest=False, client_state={
            UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}})
        weights = full_state_dict(engine, model, keep=rank == 0)  # collective; only rank 0 keeps a copy
        if rank == 0:
            if hasattr(model, "hf_files"):  # a model with task heads (train/heads.py) writes its own layout
                model.save_hf(local, state=weights)
            else:
                save_hf(model, local, state=weights)
    dist.barrier()  # every rank's files are in place
    if rank == 0:
        if before_commit is not None:
            before_commit()
        storage.write_json(join(url, STATE), {**asdict(state), "saved_at": time.time()})
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


class _staged:
    """A local directory whose files end up under url: url itself when local, else a temp dir uploaded
    on exit (every rank uploads its own files)."""

    def __init__(self, url: str):
        self.url, self.local = url, storage.is_local(url)

    def __enter__(self) -> str:
        self.path = storage.filesystem(self.url)[1] if self.local else tempfile.mkdtemp(prefix="ckpt-")
        os.makedirs(self.path, exist_ok=True)
        return self.path

    def __exit__(self, kind, *_) -> None:
        if self.local:
            return
        try:
            if kind is None:
                fs, remote = storage.filesystem(self.url)
                fs.put(self.path.rstrip("/") + "/", remote, recursive=True)
        finally:
            shutil.rmtree(self.path, ignore_errors=True)


def _prune(directory: str, keep_last: int) -> None:
    names = committed(directory)
    for name in names[:-keep_last]:
        storage.remove(join(directory, name), recursive=True)
    newest = names[-1]
    for name in storage.listdir(directory):  # uncommitted leftovers of crashed saves
        if is_step_name(name) and name not in names and name < newest:
            storage.remove(join(directory, name), recursive=True)


# --- loading --------------------------------------------------------------------------------------

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
