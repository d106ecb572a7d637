"""The one typed configuration of the pipeline, its YAML presets and dotted command-line overrides.

Every stage takes a `Config`. Presets live in `pipeline/core/configs/*.yaml`; a preset names the preset it
derives from with `extends:` and states only what differs. Overrides such as `train.lr=3e-4` are applied
after the preset is merged, and the result is validated once, before any work starts: an unknown key, a
wrong type or an impossible combination raises `ConfigError` naming the key.

This module imports nothing else of the project, so every stage may import it.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from pipeline.core import tracking
from pipeline.core.command import UserError, one_line
from pipeline.core.redaction import redact
from pipeline.core.storage import join

PRESET_DIR = Path(__file__).parent / "configs"
# What a stage's own command (tokenization/, train/, eval/run.py) uses when it names no preset: the
# production sizes (100M-token shards, 1% validation, GPT-2 124M), never smoke's toy ones on a user's
# data. Only pipeline/run.py's embedded default, the built-in corpus, is smoke.
DEFAULT_PRESET = "base"


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message names the offending key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


def profile_range(text: str) -> tuple[int, int] | None:
    """(A, B) of a train.profile_steps value "A-B" (1 <= A <= B), or None when it is not one."""
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match or not 1 <= int(match[1]) <= int(match[2]):
        return None
    return int(match[1]), int(match[2])


class _Section(BaseModel):
    # strict: a YAML string is never coerced into a number or a bool behind the user's back.
    # use_attribute_docstrings: the string under each field is its description (Model.model_fields[name].description),
    # which --help-config prints.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, use_attribute_docstrings=True)


class RunConfig(_Section):
    name: str = "smoke"
    """the run's name: its directory under run.root and its MLflow run name"""
    root: str = "runs"
    """local path or object-storage URL; the run directory is root/name"""
    seed: int = 1337
    """seeds the model's initialisation and the data order"""
    shared_fs: bool = False
    """a local run.root every node mounts (NFS): allowed on a multi-node Ray cluster"""
    lock_lease_s: float = 120.0
    """seconds an s3:// run directory's lock outlives a driver that died (it is renewed every quarter of it)"""

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        _require(self.lock_lease_s >= 2, "run.lock_lease_s", "must be at least 2 seconds")
        return self


SOURCE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")  # a source's name: part of its shard files' names


class SourceConfig(_Section):
    name: str
    """the source's name (lowercase letters, digits, _ and -, up to 32): its shards are NAME-train_*.bin, NAME-val_*.bin"""
    input: list[str]
    """what data.input takes: builtin, files / directories / globs / URLs, or hf:OWNER/NAME"""
    weight: float
    """share of each training step drawn from this source, relative to the other sources' weights (> 0);
    changing it never re-tokenizes"""
    max_epochs: float | None = None
    """at most this many passes over the source's train split (> 0); null: no cap"""
    format: Literal["auto", "jsonl", "parquet", "text"] | None = None
    """data.format for this source; null: data.format"""
    text_field: str | None = None
    """data.text_field for this source; null: data.text_field"""
    text_unit: Literal["file", "line", "paragraph"] | None = None
    """data.text_unit for this source; null: data.text_unit"""
    hf_config: str | None = None
    """data.hf_config for this source; null: data.hf_config"""
    hf_split: str | None = None
    """data.hf_split for this source; null: data.hf_split"""
    hf_revision: str | None = None
    """data.hf_revision for this source; null: data.hf_revision"""

    # what a source may set for itself; unset, data.* holds
    OVERRIDES: ClassVar[tuple[str, ...]] = ("format", "text_field", "text_unit", "hf_config", "hf_split", "hf_revision")

    @field_validator("input", mode="before")
    @classmethod
    def _one_input_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("weight", "max_epochs", mode="before")
    @classmethod
    def _an_int_is_a_float(cls, value: Any) -> Any:
        return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


class DataConfig(_Section):
    input: list[str] = ["builtin"]
    """builtin (the English prose shipped with Python), files / directories / globs (local, s3://, gs://, any
    fsspec URL), or "hf:OWNER/NAME" for a Hugging Face Hub dataset."""
    sources: list[SourceConfig] = []
    """a mixture instead of data.input: named sources, each with its input, weight and optional epoch cap,
    tokenized in one job (dedup across all) into per-source shards; empty: data.input alone"""
    format: Literal["auto", "jsonl", "parquet", "text"] = "auto"
    """input format; auto: from the file suffix"""
    text_field: str = "text"
    """the JSONL / Parquet / Hub column that holds a document's text"""
    text_unit: Literal["file", "line", "paragraph"] = "file"
    """what one document is in a text file"""
    hf_config: str | None = None
    """a Hub dataset's configuration (subset), e.g. sample-10BT"""
    hf_split: str = "train"
    """the Hub dataset's split to read"""
    hf_revision: str | None = None
    """a Hub dataset's git revision (commit, tag or branch); null: main"""

    @field_validator("input", mode="before")
    @classmethod
    def _one_input_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if not self.sources:
            return self
        # the default stays allowed: a dump of this config (the training workers' payload) sets it explicitly
        _require(self.input in ([], type(self).model_fields["input"].default), "data.input",
                 "cannot be set together with data.sources (each source names its input; "
                 "data.input: [] clears a preset's)")
        seen: set[str] = set()
        for i, s in enumerate(self.sources):  # keyed by position, as pydantic names a source's type errors
            key = f"data.sources.{i}"
            _require(bool(SOURCE_NAME.match(s.name)), f"{key}.name",
                     f"{s.name!r} must be 1-32 lowercase letters, digits, _ or -, starting with a letter or digit")
            _require(s.name not in seen, f"{key}.name", f"{s.name!r} names two sources")
            seen.add(s.name)
            _require(bool(s.input), f"{key}.input", f"source '{s.name}' must name at least one input")
            _require(math.isfinite(s.weight) and s.weight > 0, f"{key}.weight",
                     f"({s.weight}) must be a finite number > 0 (source '{s.name}')")
            _require(s.max_epochs is None or (math.isfinite(s.max_epochs) and s.max_epochs > 0), f"{key}.max_epochs",
                     f"({s.max_epochs}) must be a finite number > 0, or null (source '{s.name}')")
        return self

    def parts(self) -> list[tuple[str | None, DataConfig]]:
        """What to tokenize, in order: [(None, self)] for data.input alone, else (name, the source as a
        DataConfig of its own: its input, its overrides, the rest from data.*) per source."""
        if not self.sources:
            return [(None, self)]
        inherited = self.model_dump(exclude={"input", "sources"})
        return [(s.name, DataConfig(**{**inherited, "input": s.input,
                                       **{k: getattr(s, k) for k in SourceConfig.OVERRIDES if getattr(s, k) is not None}}))
                for s in self.sources]


class QualityConfig(_Section):
    enabled: bool = False
    """drop documents that fail any rule below (each rule counted in the manifest with examples)"""
    min_words: int = 50
    """Gopher: fewer words than this fail"""
    max_words: int = 100_000
    """Gopher: more words than this fail"""
    min_mean_word_length: float = 3.0
    """Gopher: mean word length (characters) below this fails"""
    max_mean_word_length: float = 10.0
    """Gopher: mean word length (characters) above this fails"""
    max_symbol_word_ratio: float = 0.1
    """Gopher: ('#' + ellipses) per word above this fails"""
    max_bullet_lines: float = 0.9
    """Gopher: share of lines starting with a bullet above this fails"""
    max_ellipsis_lines: float = 0.3
    """Gopher: share of lines ending with an ellipsis above this fails"""
    min_alpha_words: float = 0.8
    """Gopher: share of words holding a letter below this fails"""
    min_stop_words: int = 2
    """Gopher: fewer of the words the, be, to, of, and, that, have, with than this fails"""
    max_duplicate_lines: float = 0.3
    """Gopher repetition: share of lines that repeat an earlier line above this fails"""
    max_top_2gram: float = 0.2
    """Gopher repetition: share of characters in the most frequent word 2-gram above this fails"""
    max_duplicate_5grams: float = 0.15
    """Gopher repetition: share of characters in word 5-grams seen earlier in the document above this fails"""
    c4_rules: bool = True
    """C4: documents holding 'lorem ipsum' or a curly bracket fail"""

    @model_validator(mode="after")
    def _check(self) -> QualityConfig:
        for key in ("max_symbol_word_ratio", "max_bullet_lines", "max_ellipsis_lines", "min_alpha_words",
                    "max_duplicate_lines", "max_top_2gram", "max_duplicate_5grams"):
            _require(0.0 <= getattr(self, key) <= 1.0, f"tokenization.quality.{key}", "must be in [0, 1]")
        _require(0 <= self.min_words <= self.max_words, "tokenization.quality.min_words",
                 "must be in [0, max_words]")
        return self


class TokenizationConfig(_Section):
    output: str | None = None
    """where shards and manifest go; default: <run dir>/data"""
    tokenizer: Literal["gpt2"] = "gpt2"
    """GPT-2's BPE (tiktoken), 50,257 tokens"""
    shard_tokens: int = 100_000_000
    """tokens per shard file (2 bytes each): 100M tokens = 200 MB"""
    val_fraction: float = 0.01
    """share of documents held out for validation, chosen by document hash"""
    val_tokens: int | None = None
    """when set, a token budget replaces val_fraction"""
    strict: bool = False
    """fail on the first bad document instead of skipping and counting it"""
    max_doc_bytes: int = 1_000_000
    """longer documents are skipped and counted (bytes of UTF-8)"""
    piece_bytes: int = 64 * 2**20
    """input bytes per unit of parallel work"""
    num_workers: int | None = None
    """tokenizer actors; default: one per CPU of the cluster"""
    dedup: bool = True
    """keep one copy (the first in input order) of documents with the same normalized words (lower-cased,
    punctuation dropped: copies differing only in case, punctuation or spacing are one)"""
    near_dedup: bool = False
    """MinHash near-duplicate removal: one document (the first in input order) kept per cluster"""
    near_dedup_ngram: int = 5
    """near_dedup: shingles are this many consecutive words (lower-cased, punctuation dropped)"""
    near_dedup_bands: int = 14
    """near_dedup: LSH bands; two documents are candidates when one band's hashes all agree"""
    near_dedup_rows: int = 8
    """near_dedup: hashes per band (bands x rows MinHash permutations in all: 14 x 8 = 112, FineWeb's)"""
    quality: QualityConfig = QualityConfig()
    """Gopher/C4-style document quality rules (off unless quality.enabled)"""
    decontaminate: Literal["drop", "count", "off"] = "count"
    """training documents sharing an n-gram with an eval.hellaswag item: dropped, counted, or not checked"""
    decontaminate_ngram: int = 13
    """decontaminate: n-gram length in words (13, as GPT-3 and lm-evaluation-harness)"""

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _off(cls, value: object) -> object:
        return "off" if value is False else value  # YAML reads a bare `off` as false

    @model_validator(mode="after")
    def _check(self) -> TokenizationConfig:
        for key in ("near_dedup_ngram", "near_dedup_bands", "near_dedup_rows", "decontaminate_ngram"):
            _require(getattr(self, key) >= 1, f"tokenization.{key}", "must be >= 1")
        _require(self.shard_tokens > 0, "tokenization.shard_tokens", "must be positive")
        _require(0.0 <= self.val_fraction < 1.0, "tokenization.val_fraction", "must be in [0, 1)")
        _require(self.val_tokens is None or self.val_tokens >= 0, "tokenization.val_tokens", "must be >= 0")
        _require(self.max_doc_bytes > 0, "tokenization.max_doc_bytes", "must be positive")
        _require(self.piece_bytes > 0, "tokenization.piece_bytes", "must be positive")
        _require(self.num_workers is None or self.num_workers >= 1, "tokenization.num_workers", "must be >= 1")
        return self


class ModelConfig(_Section):
    n_layer: int = 12
    """transformer blocks"""
    n_head: int = 12
    """attention heads per block"""
    n_embd: int = 768
    """width of the residual stream; a multiple of n_head"""
    block_size: int = 1024
    """context length in tokens (learned position embeddings)"""
    vocab_size: int = 50257
    """GPT-2's BPE vocabulary"""
    pad_vocab_to: int = 64
    """embedding rows rounded up to a multiple of this (1: no padding)"""
    dropout: float = 0.0
    """on attention, residual and embeddings (GPT-2 pretraining: 0)"""
    loss_impl: Literal["chunked", "liger"] = "chunked"
    """the training loss head: chunked (ours, pipeline/core/model/gpt2.py: any device) or liger (Liger-Kernel's
    fused linear cross-entropy in Triton: GPUs only, the liger-kernel package); the same loss and gradients"""

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "pad_vocab_to"):
            _require(getattr(self, key) > 0, f"model.{key}", "must be positive")
        _require(self.n_embd % self.n_head == 0, "model.n_embd",
                 f"({self.n_embd}) must be divisible by model.n_head ({self.n_head})")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", "must be in [0, 1)")
        return self


MAX_SPIKE_WINDOW = 10_000  # the longest loss window a checkpoint may hold (pipeline/core/model/checkpoints.py)


class Schedule(_Section):
    """What pretraining (train.*) and fine-tuning (finetune.*) share: AdamW's learning rate and weight decay,
    and the schedule (linear warm-up, then cosine decay), typed, documented and checked once. A subclass
    names its section (for error messages) and its own defaults."""

    section: ClassVar[str] = "schedule"  # the config key of the subclass: train, finetune
    defaults: ClassVar[dict[str, Any]] = {}  # the subclass's defaults of the fields below

    lr: float = 6e-4
    """peak learning rate, reached at the end of warm-up"""
    warmup_steps: int = 715
    """optimizer steps of linear warm-up from 0"""
    max_steps: int = 19073
    """optimizer steps in the run (train: each of batch.tokens_per_step tokens; finetune: of finetune.batch_size
    examples)"""
    weight_decay: float = 0.1
    """AdamW decay on 2-D weights only (not biases or LayerNorm)"""
    skip_steps: str = ""
    """steps whose data is skipped, e.g. "1200-1250,3000-3010" (ranges of steps as logged, from 1, both ends
    included): those steps are not taken (no forward pass, no update) and their data is passed over; the steps
    after them keep their numbers, learning rates and data, exactly as if a bad step had not been applied there
    (Megatron-DeepSpeed's --train-range-to-skip)"""
    max_bad_steps: int = 5
    """a step whose loss or gradient norm is not finite on any rank (or whose loss spikes: spike_factor) is not
    applied, on every rank; after this many such steps in a row the run goes back to its newest intact checkpoint
    before them whose loss was finite and skips their data, a skip every later resume makes too (0: never go
    back, only leave bad steps out)"""
    spike_factor: float | None = None
    """a step whose loss is above spike_factor times the median of the last spike_window good steps' losses is bad,
    as a non-finite one is (max_bad_steps); checked once the window is full, against the median as of the last
    read of the losses off the device (train.log_interval); null: no spike check"""
    spike_window: int = 100
    """good steps' losses whose median spike_factor compares with (the latest ones); kept in every checkpoint, so a
    resume, with any number of workers, judges the steps after it as the run would have"""

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        if cls.defaults:  # a copy of the inherited field with the subclass's default (its doc and type stay)
            for name, value in cls.defaults.items():
                cls.__pydantic_fields__[name] = field = copy.copy(cls.__pydantic_fields__[name])
                field.default = value
            cls.model_rebuild(force=True)

    @model_validator(mode="after")
    def _check_schedule(self) -> Schedule:
        s = self.section
        # an AdamW step moves each weight by about lr: above 1 (or not finite) every weight is noise after a step
        _require(math.isfinite(self.lr) and self.lr <= 1, f"{s}.lr",
                 f"({self.lr}) must be finite and at most 1: larger learning rates only produce NaN")
        _require(self.lr > 0, f"{s}.lr", "must be positive")
        _require(self.max_bad_steps >= 0, f"{s}.max_bad_steps", "must be >= 0")
        _require(self.spike_factor is None or (math.isfinite(self.spike_factor) and self.spike_factor > 1),
                 f"{s}.spike_factor", f"({self.spike_factor}) must be a finite number above 1, or null")
        _require(1 <= self.spike_window <= MAX_SPIKE_WINDOW, f"{s}.spike_window",
                 f"({self.spike_window}) must be between 1 and {MAX_SPIKE_WINDOW}")
        self.skipped_ranges()  # refuses a malformed or out-of-range skip_steps
        _require(self.max_steps > 0, f"{s}.max_steps", "must be positive")
        _require(0 <= self.warmup_steps <= self.max_steps, f"{s}.warmup_steps",
                 f"({self.warmup_steps}) must be between 0 and {s}.max_steps ({self.max_steps})")
        _require(math.isfinite(self.weight_decay) and self.weight_decay >= 0, f"{s}.weight_decay",
                 "must be a finite number >= 0")
        return self

    def skipped_ranges(self) -> list[tuple[int, int]]:
        """skip_steps as (first, last) step ranges, both included; ConfigError naming the key when unreadable."""
        key, out = f"{self.section}.skip_steps", []
        for part in filter(None, (p.strip() for p in self.skip_steps.split(","))):
            match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
            _require(match is not None, key, f"cannot read {part!r}; expected ranges of steps like 120-130,400-400")
            first, last = int(match[1]), int(match[2] or match[1])
            _require(1 <= first <= last <= self.max_steps, key,
                     f"{part!r}: a range must run from a step >= 1 to one not before it and not past "
                     f"{self.section}.max_steps ({self.max_steps})")
            out.append((first, last))
        return out

    @field_validator("skip_steps", mode="before")
    @classmethod
    def _one_step_is_a_range(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class TrainConfig(Schedule):
    """Optimizer and schedule: AdamW, linear warm-up, cosine decay to min_lr_ratio * lr."""

    section: ClassVar[str] = "train"
    defaults: ClassVar[dict[str, Any]] = {"lr": 6e-4, "warmup_steps": 715, "max_steps": 19073, "weight_decay": 0.1}

    min_lr_ratio: float = 0.1
    """the cosine decay ends at min_lr_ratio * lr"""
    betas: list[float] = [0.9, 0.95]
    """AdamW's (beta1, beta2)"""
    eps: float = 1e-8
    """AdamW's epsilon"""
    grad_clip: float = 1.0
    """global gradient-norm clip; 0 disables clipping"""
    log_interval: int = 1
    """steps between reads of the loss and gradient norm off the device (one wait for the GPU per interval):
    every step's metrics are still logged, in a batch at each interval and before each checkpoint"""
    step_timeout_s: float | None = None
    """hang watchdog: seconds without a completed step after which every rank writes its Python stacks (and on
    GPUs NCCL's flight recorder) to <run dir>/diagnostics/ and the worker group fails, so Ray Train restarts it
    from the last checkpoint; null: derived, 20x the measured step time (x log_interval), at least 300 s and at
    most phase_timeout_s"""
    phase_timeout_s: float = 1800.0
    """the hang watchdog's allowance for the first steps after a (re)start (compilation, data caching), an
    evaluation and a checkpoint save; the process group's collective timeout is this plus 300 s, so the
    watchdog, not the collective, reports a hang"""
    memory_snapshot: bool = False
    """GPU runs: record CUDA allocations and, on an out-of-memory error, write PyTorch's memory snapshot
    (pytorch.org/memory_viz) to <run dir>/diagnostics/"""
    profile_steps: str | None = None
    """A-B: profile steps A to B (1-based, as logged) with torch.profiler; each rank writes a Chrome/Perfetto
    trace to <run dir>/diagnostics/ and rank 0's is logged to MLflow"""

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        _require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", "must be in [0, 1]")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "train.betas",
                 "must be two numbers in [0, 1)")
        _require(math.isfinite(self.grad_clip) and self.grad_clip >= 0, "train.grad_clip", "must be a finite number >= 0")
        _require(math.isfinite(self.eps) and self.eps > 0, "train.eps", "must be a finite positive number")
        _require(self.log_interval >= 1, "train.log_interval", "must be >= 1")
        _require(self.step_timeout_s is None or self.step_timeout_s > 0, "train.step_timeout_s",
                 "must be positive (or null: derived from the measured step time)")
        _require(self.phase_timeout_s > 0, "train.phase_timeout_s", "must be positive")
        _require(self.profile_steps is None or profile_range(self.profile_steps) is not None, "train.profile_steps",
                 f"({self.profile_steps!r}) must be A-B with 1 <= A <= B, e.g. 10-12")
        return self


class BatchConfig(_Section):
    tokens_per_step: int = 2**19
    """the global batch, over all workers and accumulation steps"""
    micro_batch_size: int = 64
    """sequences per worker per forward pass"""
    seq_len: int = 1024
    """tokens per training sequence; at most model.block_size"""


class DeepSpeedConfig(_Section):
    zero_stage: int = 1
    """0: plain data parallel; 1: shard optimizer states; 2: + gradients; 3: + weights"""
    offload_optimizer: bool = False
    """optimizer states in CPU memory (ZeRO >= 1): less GPU memory, slower steps"""
    offload_params: bool = False
    """weights in CPU memory (ZeRO-3 only)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU"""
    fp32_grads: bool = True
    """bf16 runs: sum micro-step gradients and reduce them over ranks in fp32 (true), or in bf16 (false: half the
    gradient memory and traffic, but 8 mantissa bits lose small gradients in long sums). Cost of true: ZeRO-1
    keeps 4 more bytes per parameter (an fp32 gradient beside the bf16 one), ZeRO-2/3 4 instead of 2 bytes per
    parameter of their partition, and gradient communication doubles. (ZeRO-0 has no fp32 path in DeepSpeed: it
    stays bf16.)"""
    activation_checkpointing: bool = False
    """recompute each block in backward: ~1/3 more compute, far less memory"""
    compile: bool = False
    """torch.compile the model inside the DeepSpeed engine"""

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedConfig:
        _require(self.zero_stage in (0, 1, 2, 3), "deepspeed.zero_stage", "must be 0, 1, 2 or 3")
        _require(not self.offload_params or self.zero_stage == 3, "deepspeed.offload_params",
                 "needs deepspeed.zero_stage=3 (DeepSpeed offloads parameters only in ZeRO-3)")
        _require(not self.offload_optimizer or self.zero_stage >= 1, "deepspeed.offload_optimizer",
                 "needs deepspeed.zero_stage >= 1")
        return self


class CheckpointConfig(_Section):
    dir: str | None = None
    """default: <run dir>/checkpoints"""
    interval: int = 1000
    """steps; a checkpoint is also written at the end"""
    keep_last: int = 3
    """committed checkpoints kept; older ones are deleted after each save"""

    @model_validator(mode="after")
    def _check(self) -> CheckpointConfig:
        _require(self.interval > 0, "checkpoint.interval", "must be positive")
        _require(self.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
        return self


class EvalConfig(_Section):
    interval: int = 250
    """steps between validation-loss evaluations during training (0: never)"""
    val_tokens: int = 10_485_760
    """token budget of each validation-loss evaluation"""
    hellaswag: str | None = "official"
    """official: the 10,042-item validation set, downloaded once and verified; smoke: a few items bundled for
    offline smoke runs (not comparable to anything); a JSONL/parquet path; null: skip"""
    hellaswag_interval: int = 0
    """steps between HellaSwag evaluations during training (0: never)"""
    hellaswag_limit: int | None = None
    """first N items only"""
    prompts: list[str] = ["Hello, I'm a language model,"]
    """prompts of the text samples after training"""
    max_new_tokens: int = 64
    """tokens generated per sample"""
    greedy: bool = False
    """argmax decoding instead of sampling"""
    temperature: float = 0.8
    """sampling temperature (> 0)"""
    top_k: int | None = 50
    """sample among the k likeliest tokens; null: all"""
    top_p: float | None = None
    """nucleus sampling: the smallest set with this probability; null: off"""
    num_beams: int = 1
    """> 1: beam search instead of sampling"""
    num_samples: int = 2
    """completions per prompt"""
    seed: int = 42
    """sampling seed: the same seed gives the same text"""

    @model_validator(mode="after")
    def _check(self) -> EvalConfig:
        _require(self.interval >= 0 and self.hellaswag_interval >= 0, "eval.interval", "must be >= 0")
        _require(self.temperature > 0, "eval.temperature", "must be positive (use eval.greedy for argmax)")
        _require(self.top_p is None or 0 < self.top_p <= 1, "eval.top_p", "must be in (0, 1]")
        _require(self.top_k is None or self.top_k >= 1, "eval.top_k", "must be >= 1")
        _require(self.num_beams >= 1 and self.num_samples >= 1, "eval.num_beams", "must be >= 1")
        return self


class TrackingConfig(_Section):
    enabled: bool = True
    """false: no MLflow at all (metrics still go to the console and metrics.jsonl)"""
    uri: str | None = None
    """default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"""
    experiment: str = "gpt2-pretraining"
    """MLflow experiment the runs go to"""
    registered_model: str = "gpt2-pipeline"
    """MLflow registered-model name of the register stage"""
    best_alias: str = "best"
    """alias moved to the version with the best HellaSwag score"""
    max_contaminated: float = 0.05
    """`best_alias` does not move to a model whose share of HellaSwag items overlapping its training data
    (tokenization.decontaminate) is above this"""
    allow_contaminated: bool = False
    """move `best_alias` whatever the contaminated share"""
    system_metrics: bool = True
    """log CPU, memory, (GPU) utilisation of the training run to MLflow"""

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        _require(0.0 <= self.max_contaminated <= 1.0, "tracking.max_contaminated", "must be in [0, 1]")
        return self


class StorageConfig(_Section):
    retry_s: float = 300.0
    """seconds a transient object-storage error (refused, reset, timed out, HTTP 5xx/503 SlowDown) is retried with
    back-off before the run stops with one line; an outage shorter than this costs its length, not a restart"""
    timeout_s: float = 60.0
    """connect and read timeout of each object-storage request, in seconds (storage that never answers fails
    over to the retries above)"""

    @model_validator(mode="after")
    def _check(self) -> StorageConfig:
        _require(self.retry_s >= 0, "storage.retry_s", "must be >= 0")
        _require(self.timeout_s > 0, "storage.timeout_s", "must be positive")
        return self


class ClusterConfig(_Section):
    num_workers: int = 1
    """training workers (one per GPU)"""
    use_gpu: bool = False
    """one GPU per worker, nccl and (precision auto) bf16; false: CPU, gloo, fp32"""
    cpus_per_worker: float = 1.0
    """Ray CPUs reserved per training worker (data loading, the host side)"""
    max_failures: int = 3
    """automatic restarts of the training run from its last checkpoint"""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """how Ray places the workers: PACK fills nodes, STRICT_SPREAD puts each worker on its own node"""
    node_cache: str | None = None
    """node-local directory for the one copy per node of remote (s3://, gs://) training shards; default: <system temp
    dir>/gpt2-pipeline/shards"""

    @model_validator(mode="after")
    def _check(self) -> ClusterConfig:
        _require(self.num_workers >= 1, "cluster.num_workers", "must be >= 1")
        _require(self.cpus_per_worker > 0, "cluster.cpus_per_worker", "must be positive")
        _require(self.max_failures >= 0, "cluster.max_failures", "must be >= 0")
        return self


class FinetuneHeadConfig(_Section):
    """One named head of a multi-task fine-tune (finetune.head=multi)."""

    head: Literal["classification", "regression", "token_classification"] = "classification"
    """what it predicts"""
    num_labels: int = 2
    """classes (regression: 1 output)"""
    label_field: str = "label"
    """the record field holding this head's label"""
    weight: float = 1.0
    """factor of this head's loss in the summed loss"""


class FinetuneConfig(Schedule):
    """Task heads on the pretrained trunk (pipeline/core/model/heads.py) and the fine-tune stage (train/finetuning.py); the
    optimizer and schedule (lr, warmup_steps, max_steps, weight_decay) as train.*, with their own values."""

    section: ClassVar[str] = "finetune"
    defaults: ClassVar[dict[str, Any]] = {"lr": 5e-5, "warmup_steps": 0, "max_steps": 1000, "weight_decay": 0.0}

    task: str | None = None
    """training data: JSONL/Parquet file, directory or glob (local or URL), or hf:OWNER/NAME"""
    eval_task: str | None = None
    """held-out data in its own file(s); default: a held-out part of `task`"""
    format: Literal["auto", "jsonl", "parquet"] = "auto"
    """how task files are read (auto: by suffix)"""
    hf_config: str | None = None
    """configuration of a hf: dataset (e.g. sst2 of nyu-mll/glue)"""
    hf_revision: str | None = None
    """git revision of a hf: dataset"""
    train_split: str = "train"
    """split of a hf: dataset trained on"""
    eval_split: str = "validation"
    """split of a hf: dataset scored as the held-out set"""
    eval_fraction: float = 0.1
    """files without eval_task: share of examples held out, picked by a hash of the text"""
    head: Literal["classification", "regression", "token_classification", "multi"] = "classification"
    """classification: one label per text; regression: one number; token_classification: one label per word (the text
    field is then a list of words); multi: the named heads of finetune.heads"""
    num_labels: int = 2
    """classes of a classification or token-classification head (regression: 1 output, ignored)"""
    text_fields: list[str] = ["text"]
    """record fields that make the input; several (a pair) are joined by newlines"""
    label_field: str = "label"
    """record field holding the label"""
    heads: dict[str, FinetuneHeadConfig] = {}
    """head=multi: head name -> its kind, labels, label field, loss weight"""
    classifier_dropout: float = 0.1
    """dropout before a token-classification head (transformers' default)"""
    pad_token_id: int = 50256
    """pads a batch on the right; sequence heads pool at the last other token"""
    max_len: int = 128
    """tokens per example; longer ones are truncated (and counted)"""
    batch_size: int = 32
    """examples per optimizer step, over all workers"""
    micro_batch_size: int = 8
    """examples per worker per forward pass"""
    checkpoint_interval: int = 200
    """steps between checkpoints (and one at the end)"""
    output: str | None = None
    """checkpoints, metrics, results; default: <run dir>/finetune"""
    checkpoint: str | None = None
    """pretrained model to start from (as --ckpt); pipeline default: its final checkpoint"""
    registered_model: str = "gpt2-pipeline-finetuned"
    """MLflow registry name of the fine-tuned model"""

    @field_validator("text_fields", mode="before")
    @classmethod
    def _one_field_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        _require(bool(self.text_fields), "finetune.text_fields", "must name at least one field")
        _require(self.head == "regression" or self.head == "multi" or self.num_labels >= 2, "finetune.num_labels",
                 "must be >= 2")
        _require(self.head != "multi" or bool(self.heads), "finetune.heads", "finetune.head=multi needs named heads")
        for name, h in self.heads.items():
            _require(h.num_labels >= 2 or h.head == "regression", f"finetune.heads.{name}.num_labels",
                     "must be >= 2 (regression: ignored)")
            _require(h.weight >= 0, f"finetune.heads.{name}.weight", "must be >= 0")
        _require(0.0 < self.eval_fraction < 1.0, "finetune.eval_fraction", "must be in (0, 1)")
        _require(0.0 <= self.classifier_dropout < 1.0, "finetune.classifier_dropout", "must be in [0, 1)")
        for key in ("max_len", "batch_size", "micro_batch_size", "checkpoint_interval"):
            _require(getattr(self, key) > 0, f"finetune.{key}", "must be positive")
        return self


class Config(_Section):
    run: RunConfig = RunConfig()
    """the run: its name, where its outputs go, its seed"""
    data: DataConfig = DataConfig()
    """the corpus to tokenize: files, a Hub dataset or the built-in prose"""
    tokenization: TokenizationConfig = TokenizationConfig()
    """the tokenization job: shards, validation split, bad input"""
    model: ModelConfig = ModelConfig()
    """the GPT-2 architecture"""
    train: TrainConfig = TrainConfig()
    """pretraining's optimizer (AdamW) and schedule"""
    batch: BatchConfig = BatchConfig()
    """pretraining's batch: tokens per step, micro-batch, sequence length"""
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    """DeepSpeed: ZeRO stage, offload, precision, activation checkpointing"""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """checkpoints of pretraining: where, how often, how many kept"""
    eval: EvalConfig = EvalConfig()
    """evaluation: validation loss, HellaSwag, generated samples"""
    tracking: TrackingConfig = TrackingConfig()
    """MLflow: server, experiment, registered model"""
    cluster: ClusterConfig = ClusterConfig()
    """Ray: training workers, GPUs, placement, restarts"""
    storage: StorageConfig = StorageConfig()
    """object storage under faults: request timeouts, how long transient errors are retried"""
    finetune: FinetuneConfig = FinetuneConfig()
    """the optional fine-tune: task data, heads, optimizer and schedule"""

    @model_validator(mode="after")
    def _check(self) -> Config:
        f = self.finetune
        _require(not f.task or f.batch_size % (f.micro_batch_size * self.cluster.num_workers) == 0,
                 "finetune.batch_size", f"({f.batch_size}) must be a multiple of finetune.micro_batch_size x "
                 f"cluster.num_workers = {f.micro_batch_size} x {self.cluster.num_workers}")
        _require(self.model.loss_impl != "liger" or self.cluster.use_gpu, "model.loss_impl",
                 "liger (Liger-Kernel's fused linear cross-entropy, Triton kernels) runs on GPUs only; with "
                 "cluster.use_gpu=false use model.loss_impl=chunked")
        _require(not self.train.memory_snapshot or self.cluster.use_gpu, "train.memory_snapshot",
                 "records CUDA allocations: GPU runs only (cluster.use_gpu=true)")
        b = self.batch
        for key in ("tokens_per_step", "micro_batch_size", "seq_len"):
            _require(getattr(b, key) > 0, f"batch.{key}", "must be positive")
        _require(b.seq_len <= self.model.block_size, "batch.seq_len",
                 f"({b.seq_len}) exceeds model.block_size ({self.model.block_size})")
        per_pass = b.micro_batch_size * b.seq_len * self.cluster.num_workers
        _require(b.tokens_per_step % per_pass == 0, "batch.tokens_per_step",
                 f"({b.tokens_per_step}) must be a multiple of batch.micro_batch_size x batch.seq_len x "
                 f"cluster.num_workers = {b.micro_batch_size} x {b.seq_len} x {self.cluster.num_workers} "
                 f"= {per_pass}")
        return self

    # Derived values: computed, never stored, so they cannot disagree with the fields they come from.
    @property
    def run_dir(self) -> str:
        return join(self.run.root, self.run.name)

    @property
    def data_dir(self) -> str:
        return self.tokenization.output or join(self.run_dir, "data")

    @property
    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or join(self.run_dir, "checkpoints")

    @property
    def eval_dir(self) -> str:
        return join(self.run_dir, "eval")

    @property
    def finetune_dir(self) -> str:
        return self.finetune.output or join(self.run_dir, "finetune")

    @property
    def metrics_url(self) -> str:
        return tracking.metrics_url(self.run_dir)

    @property
    def metrics_file(self) -> str:
        return tracking.metrics_file(self.run_dir)

    def with_absolute_paths(self) -> Config:
        """A copy whose local paths are absolute: Ray workers run in other directories. Outputs resolve
        against output_base() (not Ray's temporary copy of a job's working directory), inputs against
        the working directory."""
        def absolute(path: str | None, base: str) -> str | None:
            if path is None or "://" in path or path.startswith(("hf:", "models:")):
                return path
            return os.path.normpath(os.path.join(base, os.path.expanduser(path)))

        out, here = output_base(), os.getcwd()
        return self.model_copy(update={
            "run": self.run.model_copy(update={"root": absolute(self.run.root, out)}),
            "tokenization": self.tokenization.model_copy(update={"output": absolute(self.tokenization.output, out)}),
            "checkpoint": self.checkpoint.model_copy(update={"dir": absolute(self.checkpoint.dir, out)}),
            "eval": self.eval.model_copy(update={"hellaswag": self.eval.hellaswag if self.eval.hellaswag in
                                                 (None, "official", "smoke") else absolute(self.eval.hellaswag, here)}),
            "finetune": self.finetune.model_copy(update={"task": absolute(self.finetune.task, here),
                                                         "eval_task": absolute(self.finetune.eval_task, here),
                                                         "checkpoint": absolute(self.finetune.checkpoint, here),
                                                         "output": absolute(self.finetune.output, out)}),
        })

    def flat(self) -> dict[str, Any]:
        """The config as {"section.key": value}, e.g. for MLflow params."""
        return {f"{section}.{key}": _redacted(value)
                for section, fields in self.model_dump().items() for key, value in fields.items()}

    def fingerprint(self, *sections: str) -> str:
        """sha256 of the named sections (all when none), stable across processes and key order."""
        dump = self.model_dump()
        chosen = {s: dump[s] for s in sections} if sections else dump
        return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        """The config as YAML, credentials in URIs redacted: what is logged and stored of it."""
        return redact(yaml.safe_dump(self.model_dump(), sort_keys=False))


# ---------------------------------------------------------------------------------------------
# The reference: every key of the config, its type, value and doc (--help-config of every command).

HEAD_NAME = "<name>"  # stands for a head's name in finetune.heads.<name>.KEY
ENTRY_INDEX = "<i>"  # stands for a source's position in data.sources.<i>.KEY
_PLACEHOLDERS = (HEAD_NAME, ENTRY_INDEX)


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    args, origin = get_args(annotation), get_origin(annotation)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if args:  # X | None
        return " | ".join(_type_name(a) for a in args)
    return getattr(annotation, "__name__", str(annotation))


def _entry_model(annotation: Any) -> tuple[type[BaseModel], str] | None:
    """(Model, placeholder) when annotation is dict[str, Model] (finetune.heads) or list[Model] (data.sources)."""
    args, origin = get_args(annotation), get_origin(annotation)
    entry = args[-1] if origin in (dict, list) and args else None
    if isinstance(entry, type) and issubclass(entry, BaseModel):
        return entry, HEAD_NAME if origin is dict else ENTRY_INDEX
    return None


def leaf_fields(model: type[BaseModel] = Config, prefix: str = "") -> dict[str, Any]:
    """{dotted key: FieldInfo} of every leaf of the config; a dict or list of sections (finetune.heads,
    data.sources) is listed as its entries' fields under `<name>` or `<i>` (finetune.heads.<name>.weight)."""
    out: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out.update(leaf_fields(annotation, f"{key}."))
        elif (entry := _entry_model(annotation)) is not None:
            out.update(leaf_fields(entry[0], f"{key}.{entry[1]}."))
        else:
            out[key] = field
    return out


def _value_at(cfg: BaseModel, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        if part in _PLACEHOLDERS:
            return None
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def reference(cfg: Config) -> str:
    """Every key of the config, one line each: `section.key  type  value in force  what it does`. The
    fields of finetune.heads (data.sources) are listed under <name> (<i>) with their defaults, then for
    each configured head (source)."""
    rows = []
    fields = leaf_fields()
    for key, field in fields.items():
        placeholder = next((p for p in _PLACEHOLDERS if f".{p}." in key), None)
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        value = default if placeholder else _value_at(cfg, key)
        rows.append((key, _type_name(field.annotation), value, field.description or ""))
        if placeholder:  # the configured entries, with their values
            section, leaf = key.split(f".{placeholder}.")
            entries = _value_at(cfg, section)
            for name, entry in (entries.items() if isinstance(entries, dict) else enumerate(entries)):
                rows.append((f"{section}.{name}.{leaf}", _type_name(field.annotation), getattr(entry, leaf),
                             field.description or ""))
    rows = [(k, t, json.dumps(v), " ".join(doc.split())) for k, t, v, doc in rows]
    kw = max(len(r[0]) for r in rows)
    tw = min(22, max(len(r[1]) for r in rows))
    vw = min(24, max(len(r[2]) for r in rows))
    return "\n".join(f"{k:<{kw}}  {t:<{tw}}  {v:<{vw}}  {doc}" for k, t, v, doc in rows)


def _redacted(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, list):
        return [_redacted(v) for v in value]
    if isinstance(value, dict):  # a data.sources entry
        return {k: _redacted(v) for k, v in value.items()}
    return value


HOME_ENV = "GPT2_PIPELINE_HOME"


def in_ray_package_cache(path: str | None = None) -> bool:
    """Whether path (default: the working directory) is inside Ray's unpacked copy of a job's working_dir,
    a cache Ray deletes when the session ends or space runs short, renamed whenever a file changes."""
    path = path or os.getcwd()
    return "runtime_resources/working_dir_files" in path or "/_ray_pkg_" in path


def output_base() -> str:
    """The directory relative output paths (run.root, the default MLflow store) resolve against: the working
    directory, except inside Ray's package cache, where it is $GPT2_PIPELINE_HOME or ~/gpt2-pipeline on
    the node that runs the driver, so a resubmitted job finds its run and MLflow store again."""
    if not in_ray_package_cache():
        return os.getcwd()
    return os.path.abspath(os.path.expanduser(os.environ.get(HOME_ENV) or "~/gpt2-pipeline"))


# ---------------------------------------------------------------------------------------------
# YAML: PyYAML follows YAML 1.1, where `6e-4` is a string; accept it as the float everyone means.

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def parse_yaml(text: str, where: str = "YAML") -> Any:
    """Safe YAML (no Python tags: nothing in a preset or an override can run code); an error names `where`."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{where}: not valid YAML{at} ({getattr(err, 'problem', None) or one_line(err)})") from None


# --config's help in every stage command (pipeline/run.py says its own default)
PRESET_HELP = f"preset name or YAML path (default: {DEFAULT_PRESET}, production sizes; smoke for a CPU-sized trial)"


def preset_in_force(name: str | None, default: str = DEFAULT_PRESET) -> str:
    """The preset a command runs (--config `name`, else `default`), printed as its first line, with why
    when the user named none."""
    if name is not None:
        print(f"config: preset '{name}'", flush=True)
        return name
    what = "production defaults" if default == DEFAULT_PRESET else "the embedded default"
    print(f"config: preset '{default}' ({what}; no --config given)", flush=True)
    return default


# The argument parser of every command: --config, --help-config, section.key=value overrides.

HELP_CONFIG = ("print every config key (dotted), its type, the value in force for the preset and the "
               "overrides given, and what it does; then exit")


class CommandParser(argparse.ArgumentParser):
    """argparse with what every stage command takes: --config PRESET, --help-config and positional
    `section.key=value` overrides. With --help-config no argument is required (as with --help), so
    `eval/run.py --help-config` works without --ckpt."""

    def __init__(self, *args: Any, preset_help: str | None = None, **kwargs: Any):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--config", help=PRESET_HELP if preset_help is None else preset_help)
        self.add_argument("--help-config", action="store_true", help=HELP_CONFIG)

    def add_overrides(self) -> None:
        """The trailing `section.key=value` arguments (added last, so they read last in --help)."""
        self.add_argument("overrides", nargs="*", metavar="section.key=value",
                          help="override any config key, e.g. train.lr=3e-4 (see --help-config)")

    def parse_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        if "--help-config" in args:
            for action in self._actions:
                action.required = False
        # overrides may stand anywhere, also before options: `run.py train.lr=3e-4 --stages train`
        return super().parse_intermixed_args(args, namespace)


def help_config(args: argparse.Namespace, cfg: Config) -> bool:
    """With --help-config: print the config reference of `cfg` (the config in force) and return True, so
    the command returns 0 before any work."""
    if not getattr(args, "help_config", False):
        return False
    print(reference(cfg), flush=True)
    return True


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _preset_path(name: str, relative_to: Path | None = None) -> Path:
    candidates = [Path(name)] if name.endswith((".yaml", ".yml")) else []
    if relative_to is not None:
        candidates.append(relative_to / f"{name}.yaml")
    candidates.append(PRESET_DIR / f"{name}.yaml")
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(f"preset '{name}' not found; presets: {', '.join(preset_names())} "
                      f"(or a path to a YAML file)")


def _load_raw(name: str, relative_to: Path | None = None, seen: tuple[Path, ...] = ()) -> dict:
    path = _preset_path(name, relative_to).resolve()
    if path in seen:
        raise ConfigError(f"preset {path}: 'extends' forms a cycle")
    raw = parse_yaml(path.read_text(), f"preset {path}") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path}: top level must be a mapping")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    return _merge(_load_raw(parent, path.parent, (*seen, path)), raw)


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def apply_override(raw: dict, override: str) -> None:
    """Apply one `section.key=value` override to a raw config dict; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' is not of the form section.key=value")
    dotted, value = override.split("=", 1)
    set_key(raw, dotted.strip(), parse_yaml(value, f"override '{override}'") if value.strip() else None)


def set_key(raw: dict, dotted: str, value: Any) -> None:
    """Set `section.key` in a raw config dict (validation comes later, all at once)."""
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | tuple[str, ...] = (),
                values: dict[str, Any] | None = None) -> Config:
    """Load a preset (name or YAML path), apply dotted overrides, then `values` ({"data.input": [...]},
    from command-line flags), and validate everything once."""
    raw = _load_raw(preset)
    for override in overrides:
        apply_override(raw, override)
    for dotted, value in (values or {}).items():
        set_key(raw, dotted, value)
    return validate(raw)


def validate(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_explain(err)) from None


def _explain(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = [str(p) for p in e["loc"]]
        key = ".".join(loc)
        if e["type"] == "extra_forbidden":
            known = _known_keys(loc[:-1])
            close = difflib.get_close_matches(loc[-1], known, n=1)
            hint = f" (did you mean '{'.'.join([*loc[:-1], close[0]])}'?)" if close else ""
            lines.append(f"unknown key '{key}'{hint}")
        elif e["type"] == "value_error" and isinstance(e.get("ctx", {}).get("error"), ConfigError):
            lines.append(str(e["ctx"]["error"]))
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _known_keys(loc: list[str]) -> list[str]:
    model: type[BaseModel] = Config
    for part in loc:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)
