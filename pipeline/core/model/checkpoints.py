"""Checkpoints as files: the layout our trainer commits, and opening a model from whatever `--ckpt` names,
without unpickling anything untrusted. Writing them (DeepSpeed state, the commit) is train/checkpoint.py's.

Our trainer's layout:

    <checkpoint dir>/
      step_00000100/
        deepspeed/state/       every rank's DeepSpeed state (weights, ZeRO optimizer partitions)
        model.safetensors      consolidated fp32 weights under GPT-2's Hugging Face names
        config.json            so `transformers` opens the directory as GPT2LMHeadModel
        trainer_state.json     written last, by rank 0: its presence commits the checkpoint; it records
                               every other file's size and sha256 ("files"), checked before use (`damage`)
      latest                   the newest committed checkpoint's name, updated after the commit

`load` accepts:
- a checkpoint of our trainer: a step_NNNNNNNN directory (trainer_state.json, model.safetensors,
  config.json) or the checkpoint directory holding them (its newest committed one);
- a DeepSpeed checkpoint directory (a `latest` file and tag directories, or one tag directory),
  consolidated through DeepSpeed's fp32 API with torch.load forced to weights_only;
- a Hugging Face GPT-2 directory: config.json with model.safetensors, or pytorch_model.bin read
  with weights_only=True;
- hf:NAME, e.g. hf:gpt2, downloaded from the Hub (config and weights only);
- models:/NAME/VERSION or models:/NAME@ALIAS, a version of the MLflow Model Registry ($MLFLOW_TRACKING_URI), its
  files checked against the sha256 the registry recorded (pipeline/core/registry.download_verified).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.core import storage
from pipeline.core.command import UserError
from pipeline.core.config import MAX_SPIKE_WINDOW
from pipeline.core.model import heads
from pipeline.core.model.gpt2 import GPT, GPTConfig, config_from_hf, from_hf_state_dict, from_state_dict, load_hf
from pipeline.core.storage import join

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
    # steps whose data the run skips ([first, last], both included, merged, in order): the schedule's skip_steps
    # and those left behind by going back from a run of bad steps (train/loop.py); every resume skips them too
    skip_steps: list[list[int]] = field(default_factory=list)
    # the latest good steps' losses (at most the schedule's spike_window), whose median the spike check compares
    # with (train/loop.py): kept so that a resume judges the steps after it as the run would have
    loss_window: list[float] = field(default_factory=list)

    @classmethod
    def read(cls, url: str) -> TrainerState:
        """The state a checkpoint committed, each field checked: a damaged or hand-edited record is refused
        with the file and field named, never resumed from."""
        where = join(url, STATE)
        try:
            data = json.loads(storage.read_bytes(where))
        except ValueError as err:
            raise CheckpointError(f"{where}: not a JSON trainer state ({err})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{where}: must be a JSON object, got {type(data).__name__}")
        for key, ok, what in _STATE_FIELDS:
            if key in data and not ok(data[key]):
                raise CheckpointError(f"{where}: {key}: must be {what} (got {data[key]!r:.80})")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


_STATE_FIELDS = (
    ("step", _count, "a non-negative integer"),
    ("sequences", _count, "a non-negative integer"),
    ("tokens", _count, "a non-negative integer"),
    ("world_size", lambda v: _count(v) and v >= 1, "a positive integer"),
    ("zero_stage", lambda v: v in (0, 1, 2, 3) and not isinstance(v, bool), "0, 1, 2 or 3"),
    ("manifest_sha256", lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}|", v) is not None,
     "64 lowercase hex digits"),
    ("data_order", lambda v: isinstance(v, str) and len(v) < 200, "a short string"),
    ("run_id", lambda v: v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-zA-Z_-]{1,64}", v) is not None),
     "an MLflow run id or null"),
    ("loss", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)), "a number or null"),
    ("skip_steps", lambda v: isinstance(v, list) and len(v) <= 100_000 and all(
        isinstance(r, list) and len(r) == 2 and all(_count(n) for n in r) and 1 <= r[0] <= r[1] for r in v),
     "a list of [first, last] step ranges (1 <= first <= last)"),
    ("loss_window", lambda v: isinstance(v, list) and len(v) <= MAX_SPIKE_WINDOW and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v),
     f"a list of at most {MAX_SPIKE_WINDOW} finite numbers"),
)


_FILE_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)*$")


def recorded_files(url: str) -> dict[str, dict]:
    """{relative path: {"size", "sha256"}} of every file the commit of the checkpoint at url recorded ({} for a
    checkpoint written before they were recorded), each entry checked as hostile input: a path that would
    leave the checkpoint, a size or a digest of the wrong form is a CheckpointError naming the field."""
    where = join(url, STATE)
    try:
        data = json.loads(storage.read_bytes(where))
    except ValueError as err:
        raise CheckpointError(f"{where}: not a JSON trainer state ({err})") from None
    record = data.get("files", {}) if isinstance(data, dict) else None
    if not isinstance(record, dict):
        raise CheckpointError(f"{where}: files: must be an object of file records")
    for name, entry in record.items():
        if not (_FILE_NAME.match(name) and ".." not in name.split("/") and name != STATE):
            raise CheckpointError(f"{where}: files: {name!r:.80} is not a file name inside the checkpoint")
        if not (isinstance(entry, dict) and _count(entry.get("size"))
                and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise CheckpointError(f"{where}: files: {name}: must be {{size: a count, sha256: 64 hex digits}}")
    return record


def damage(url: str, hashed: Callable[[list[str]], Iterable[str]] | None = None) -> str | None:
    """What is wrong with the committed checkpoint at url, in one line naming the file, or None when it is
    intact: its record reads, every recorded file is there with its recorded size, and those that `hashed`
    picks from the sorted names (default: all) have their recorded sha256. Sizes cost one listing; digests
    read the files (a download on object storage), so a caller may split them over ranks or skip some."""
    try:
        TrainerState.read(url)
        record = recorded_files(url)
    except (CheckpointError, FileNotFoundError) as err:
        return str(err)
    present = storage.files(url)
    for name in sorted(record):
        if name not in present:
            return f"{join(url, name)}: missing"
        if present[name] != record[name]["size"]:
            return f"{join(url, name)}: {present[name]} bytes, but its commit recorded {record[name]['size']}"
    for name in (hashed or (lambda names: names))(sorted(record)):
        if storage.sha256(join(url, name)) != record[name]["sha256"]:
            return f"{join(url, name)}: its bytes changed since the commit (sha256 differs from the record)"
    return None


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


def finite(directory: str, before: int | None = None) -> list[str]:
    """Names of the committed checkpoints whose recorded loss is finite (or not yet known), oldest first, among
    those of steps before `before` when given: the ones a run of bad steps may go back to
    (train/checkpoint.newest_intact picks among them), the newest of which pruning keeps. A checkpoint whose
    trainer state does not read is left out."""
    out = []
    for name in committed(directory):
        try:
            state = TrainerState.read(join(directory, name))
        except CheckpointError:
            continue
        if (before is None or state.step < before) and (state.loss is None or math.isfinite(state.loss)):
            out.append(name)
    return out


def finished(directory: str, max_steps: int) -> str | None:
    """URL of the newest committed checkpoint if it is at max_steps or beyond (training is done), else None."""
    url = latest(directory)
    if url and TrainerState.read(url).step >= max_steps:
        return url
    return None


def resolve(path: str) -> str:
    """A checkpoint given by the user: a checkpoint directory (its latest) or one checkpoint."""
    if storage.exists(join(path, STATE)):
        return path
    found = latest(path)
    if found is None:
        raise CheckpointError(f"{path}: no committed checkpoint here (expected {STATE} in it, "
                              f"or step_NNNNNNNN/{STATE} below it)")
    return found



# --- opening any checkpoint ----------------------------------------------------------------------

LAYOUTS = ("trainer checkpoint: trainer_state.json + model.safetensors + config.json (or step_* below it)",
           "Hugging Face: config.json + model.safetensors or pytorch_model.bin",
           "DeepSpeed: a 'latest' file naming a tag directory, or a tag directory of *_model_states.pt files")


def load(spec: str, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model and a description of where it came from (layout, path, step, weights sha256)."""
    forbid_unpickling(deepspeed_records=False)
    if spec.startswith("hf:"):
        return _hf_dir(_download(spec[3:]), device, {"layout": "huggingface-hub", "name": spec[3:]})
    if spec.startswith("models:/"):  # a registered version, its files checked against the registry's record
        from pipeline.core import registry

        local, version = registry.download_verified(spec)
        return _hf_dir(Path(local, "artifacts", "checkpoint"), device, {"layout": "mlflow-registry", "name": version.name,
                                                                         "version": version.version,
                                                                         "run_id": version.run_id})
    path = Path(spec if storage.is_local(spec) else _fetch(spec))
    if not path.exists():
        raise CheckpointError(f"{spec}: no such file or directory")
    if path.is_file():
        if path.name in ("model.safetensors", "pytorch_model.bin", "trainer_state.json", "config.json"):
            path = path.parent
        else:
            raise CheckpointError(f"{spec}: a file; --ckpt takes a directory ({'; '.join(LAYOUTS)})")
    names = {p.name for p in path.iterdir()}
    if STATE in names or any(is_step_name(n) for n in names):
        step_dir = Path(resolve(str(path)))
        state = TrainerState.read(str(step_dir))
        _refuse_damaged(str(step_dir))
        return _hf_dir(step_dir, device, {"layout": "trainer", "step": state.step, "tokens": state.tokens,
                                          "run_id": state.run_id, "manifest_sha256": state.manifest_sha256})
    if "config.json" in names and names & {"model.safetensors", "pytorch_model.bin"}:
        return _hf_dir(path, device, {"layout": "huggingface"})
    deepspeed_tag = _deepspeed_tag(path, names)
    if deepspeed_tag is not None:
        return _deepspeed(path, deepspeed_tag, device)
    raise CheckpointError(f"{spec}: unknown checkpoint layout; found {sorted(names) or 'an empty directory'}; "
                          f"expected one of: {'; '.join(LAYOUTS)}")


def _refuse_damaged(step_dir: str) -> None:
    """A CheckpointError naming the file when a checkpoint of ours no longer matches its commit. Local: every
    file is checked. On object storage (step_dir is then _fetch's copy of its model files): the sizes of all,
    and the digests of the copies read here, which decide the model (evaluation downloads no optimizer state)."""
    remote = _fetched.get(step_dir)
    problem = damage(remote or step_dir, hashed=(lambda names: []) if remote else None)
    if remote and not problem:
        record = recorded_files(remote)
        problem = next((f"{join(remote, n)}: its bytes changed since the commit (sha256 differs from the record)"
                        for n in sorted(record) if "/" not in n
                        and storage.sha256(os.path.join(step_dir, n)) != record[n]["sha256"]), None)
    if problem:
        raise CheckpointError(f"damaged checkpoint, refused: {problem}")


_fetched: dict[str, str] = {}  # local copy -> the checkpoint on object storage it was fetched from


def _fetch(url: str) -> str:
    """A local copy of a checkpoint on object storage; of one of ours, only the model files, not the
    DeepSpeed optimizer state beside them."""
    if not storage.exists(url):
        raise CheckpointError(f"{url}: no such file or directory")
    try:
        step = resolve(url)
    except CheckpointError:
        if any(is_step_name(n) for n in storage.listdir(url)):
            raise  # a checkpoint directory of ours with nothing committed in it: say so, naming the URL
        return storage.local_copy(url)  # a Hugging Face or DeepSpeed directory: all of it
    local = storage.local_copy(step, keep=lambda rel: "/" not in rel)
    _fetched[local] = step
    return local


def _hf_dir(path: Path, device, info: dict) -> tuple[GPT, dict]:
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: no config.json beside the weights")
    weights = path / "model.safetensors"
    weights = weights if weights.exists() else path / "pytorch_model.bin"
    config = _read_config(path / "config.json")
    try:
        fine_tuned = heads.specs_from_hf(config)
        model = heads.load_hf(path).trunk if fine_tuned else load_hf(path)  # with task heads: the trunk
    except (ValueError, KeyError) as err:  # a config we do not implement, or weights that do not fit it
        raise CheckpointError(str(err) if str(path) in str(err) else f"{path / 'config.json'}: {err}") from None
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as err:  # weights that do not read
        raise CheckpointError(f"{weights}: not readable weights ({type(err).__name__}: {err})") from None
    return model.to(device), {**info, "path": str(path), "weights": str(weights), "weights_sha256": _sha256(weights)}


def _read_config(path: Path) -> dict:
    """A checkpoint's config.json, or a CheckpointError naming the file."""
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # unreadable, not UTF-8, not JSON
        raise CheckpointError(f"{path}: not a readable JSON file ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return config


def _deepspeed_tag(path: Path, names: set[str]) -> str | None:
    """The tag to load: named by `latest`, the only tag directory, or "" when path is a tag directory."""
    if "latest" in names:
        tag = (path / "latest").read_text().strip()
        return tag if (path / tag).is_dir() else None
    if any(n.endswith("model_states.pt") for n in names):
        return ""
    tags = sorted(n for n in names if (path / n).is_dir() and any((path / n).glob("*model_states.pt")))
    if len(tags) > 1:
        raise CheckpointError(f"{path}: DeepSpeed checkpoint with tags {tags} and no 'latest' file; "
                              f"pass one of them, e.g. --ckpt {path / tags[-1]}")
    return tags[0] if tags else None


def _deepspeed(path: Path, tag: str, device) -> tuple[GPT, dict]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    forbid_unpickling(deepspeed_records=True)
    root, tag = (path, tag) if tag else (path.parent, path.name)
    state = {k: v.detach() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag).items()}
    config_file = next((d / "config.json" for d in (root, *root.parents[:3]) if (d / "config.json").exists()), None)
    if config_file is not None:  # our layout: step_N/config.json beside step_N/deepspeed/state
        try:
            config = config_from_hf(_read_config(config_file))
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{config_file}: {err if isinstance(err, ValueError) else f'no key {err}'}") from None
    else:
        config = _config_from_shapes(state, root)
    c_attn = state.get("transformer.h.0.attn.c_attn.weight")
    if c_attn is not None and c_attn.shape[0] == config.n_embd:
        state = from_hf_state_dict(state, config)  # a transformers GPT2 trained under DeepSpeed: Conv1D layout
    try:
        model = from_state_dict(config, state, root / tag)
    except ValueError as err:
        raise CheckpointError(str(err)) from None
    return model.to(device), {"layout": "deepspeed", "path": str(root / tag), "config": str(config_file),
                              "weights_sha256": hashlib.sha256(b"".join(
                                  state[k].contiguous().numpy().tobytes() for k in sorted(state))).hexdigest()}


def _config_from_shapes(state: dict[str, torch.Tensor], where: Path) -> GPTConfig:
    try:
        wte, wpe = state["transformer.wte.weight"], state["transformer.wpe.weight"]
    except KeyError:
        raise CheckpointError(f"{where}: DeepSpeed state without transformer.wte/wpe weights; not a GPT-2 "
                              f"({', '.join(list(state)[:5])}, ...)") from None
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.h\.(\d+)\.", k))}
    # no config.json to say otherwise: GPT-2's heads are 64 wide at every size
    return GPTConfig(n_layer=len(layers), n_head=wte.shape[1] // 64, n_embd=wte.shape[1], block_size=wpe.shape[0])


def _download(name: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as err:  # offline or unknown repo
        raise CheckpointError(f"hf:{name}: cannot download from the Hugging Face Hub "
                              f"({type(err).__name__}: {err})") from err


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()
