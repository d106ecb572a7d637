"""The model a fine-tune starts from: whatever --ckpt names (anything eval/run.py --ckpt takes: our checkpoints,
local or on object storage, a DeepSpeed or Hugging Face directory, hf:NAME; or a registered model,
models:/NAME@ALIAS or models:/NAME/VERSION) with the configured task heads on it. A checkpoint that already
has heads (one of ours, or transformers' GPT2ForSequenceClassification / GPT2ForTokenClassification)
continues with them if they match finetune.*, and is refused if they do not.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

from pipeline.core import storage
from pipeline.core.config import Config, output_base
from pipeline.core.lineage import tracking_uri
from pipeline.core.model import checkpoints, heads
from pipeline.core.model.checkpoints import CheckpointError
from pipeline.core.redaction import redact
from pipeline.core.storage import join
from train import tasks

SOURCE = "source.json"  # beside the starting model: what --ckpt named and where it came from


def write(cfg: Config, spec: str, init: str, log=print) -> dict:
    """Open the starting checkpoint, put the configured heads on it (kept from the checkpoint when it has
    matching ones, new otherwise, seeded by run.seed) and write it to `init`; returns its description."""
    local = _registered(spec, cfg) if spec.startswith("models:/") else None
    trunk, info = checkpoints.load(local["path"] if local else spec)
    info = {**info, **(local or {}), "spec": spec}
    specs = tasks.head_specs(cfg.finetune)
    config_file = Path(info.get("path", ""), "config.json")
    found = heads.specs_from_hf(json.loads(config_file.read_text())) if config_file.is_file() else {}
    if found:
        heads.check_heads(specs, found, str(config_file))
        model = heads.load_hf(config_file.parent)
        if set(model.specs) != set(specs):  # one head, saved under another name
            (old,), (new,) = model.specs, specs
            model.heads = torch.nn.ModuleDict({new: model.heads[old]})
        model.specs = dict(specs)  # same kinds and sizes; loss weights and dropout as configured now
        log(f"finetune: starting from {spec} with its heads ({', '.join(specs)})")
    else:
        torch.manual_seed(cfg.run.seed)
        model = heads.TaskModel(trunk, specs, cfg.finetune.pad_token_id)
        log(f"finetune: starting from {spec} with new heads ({', '.join(f'{n}: {s.kind}' for n, s in specs.items())})")
    model.pad_token_id = cfg.finetune.pad_token_id
    with tempfile.TemporaryDirectory() as tmp:
        model.save_hf(tmp)
        for name in ("model.safetensors", "config.json"):
            storage.write_bytes(join(init, name), Path(tmp, name).read_bytes())
    storage.write_json(join(init, SOURCE), info)
    return info


def _registered(spec: str, cfg: Config) -> dict:
    """A registered model's weights, downloaded and checked file by file against the sha256 its registry
    version recorded (pipeline/core/registry.py), and the run that registered them."""
    from pipeline.core.registry import ModelIntegrityError, download_verified

    uri = tracking_uri(cfg.tracking.uri, output_base())
    try:
        path, version = download_verified(spec, uri)
    except ModelIntegrityError as err:  # a tampered or unrecorded version: refused, naming the file
        raise CheckpointError(str(err)) from err
    except Exception as err:  # MlflowException, a bad name, the server down: the user needs the spec named
        raise CheckpointError(f"{spec}: cannot read this registered model from {redact(uri)} ({type(err).__name__}: {err})") from err
    weights = os.path.join(path, "artifacts", "checkpoint")
    if not os.path.isfile(os.path.join(weights, "config.json")):
        raise CheckpointError(f"{spec}: the registered model holds no artifacts/checkpoint/config.json")
    return {"path": weights, "run_id": version.run_id, "registered": f"{version.name}/{version.version}"}
