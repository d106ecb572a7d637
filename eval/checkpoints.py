"""Open a model from whatever `--ckpt` names, without unpickling anything untrusted.

Accepted:
- a checkpoint of our trainer: a step_NNNNNNNN directory (trainer_state.json, model.safetensors,
  config.json) or the checkpoint directory holding them (its newest committed one);
- a DeepSpeed checkpoint directory (a `latest` file and tag directories, or one tag directory),
  consolidated through DeepSpeed's fp32 API with torch.load forced to weights_only;
- a Hugging Face GPT-2 directory: config.json with model.safetensors, or pytorch_model.bin read
  with weights_only=True;
- hf:NAME, e.g. hf:gpt2, downloaded from the Hub (config and weights only).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from pathlib import Path

import torch
from safetensors import SafetensorError

from pipeline.core import storage
from train import checkpoint as trainer_checkpoint
from train import heads
from train.checkpoint import CheckpointError
from train.model import GPT, GPTConfig, config_from_hf, from_hf_state_dict, from_state_dict, load_hf

LAYOUTS = ("trainer checkpoint: trainer_state.json + model.safetensors + config.json (or step_* below it)",
           "Hugging Face: config.json + model.safetensors or pytorch_model.bin",
           "DeepSpeed: a 'latest' file naming a tag directory, or a tag directory of *_model_states.pt files")


def load(spec: str, device: str | torch.device = "cpu") -> tuple[GPT, dict]:
    """The model and a description of where it came from (layout, path, step, weights sha256)."""
    trainer_checkpoint.forbid_unpickling(deepspeed_records=False)
    if spec.startswith("hf:"):
        return _hf_dir(_download(spec[3:]), device, {"layout": "huggingface-hub", "name": spec[3:]})
    path = Path(spec if storage.is_local(spec) else _fetch(spec))
    if not path.exists():
        raise CheckpointError(f"{spec}: no such file or directory")
    if path.is_file():
        if path.name in ("model.safetensors", "pytorch_model.bin", "trainer_state.json", "config.json"):
            path = path.parent
        else:
            raise CheckpointError(f"{spec}: a file; --ckpt takes a directory ({'; '.join(LAYOUTS)})")
    names = {p.name for p in path.iterdir()}
    if trainer_checkpoint.STATE in names or any(trainer_checkpoint.is_step_name(n) for n in names):
        step_dir = Path(trainer_checkpoint.resolve(str(path)))
        state = trainer_checkpoint.TrainerState.read(str(step_dir))
        return _hf_dir(step_dir, device, {"layout": "trainer", "step": state.step, "tokens": state.tokens,
                                          "run_id": state.run_id, "manifest_sha256": state.manifest_sha256})
    if "config.json" in names and names & {"model.safetensors", "pytorch_model.bin"}:
        return _hf_dir(path, device, {"layout": "huggingface"})
    deepspeed_tag = _deepspeed_tag(path, names)
    if deepspeed_tag is not None:
        return _deepspeed(path, deepspeed_tag, device)
    raise CheckpointError(f"{spec}: unknown checkpoint layout; found {sorted(names) or 'an empty directory'}; "
                          f"expected one of: {'; '.join(LAYOUTS)}")


def _fetch(url: str) -> str:
    """A local copy of a checkpoint on object storage; of one of ours, only the model files, not the
    DeepSpeed optimizer state beside them."""
    if not storage.exists(url):
        raise CheckpointError(f"{url}: no such file or directory")
    try:
        step = trainer_checkpoint.resolve(url)
    except CheckpointError:
        if any(trainer_checkpoint.is_step_name(n) for n in storage.listdir(url)):
            raise  # a checkpoint directory of ours with nothing committed in it: say so, naming the URL
        return storage.local_copy(url)  # a Hugging Face or DeepSpeed directory: all of it
    return storage.local_copy(step, keep=lambda rel: "/" not in rel)


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

    trainer_checkpoint.forbid_unpickling(deepspeed_records=True)
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
