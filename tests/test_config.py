"""The typed config: every preset parses, presets derive instead of repeating, bad keys are named."""

from __future__ import annotations

import pytest
from conftest import REPO, config_leaves

from pipeline.core.config import PRESET_DIR, ConfigError, _load_raw, load_config, parse_yaml, preset_names
from train.engine import deepspeed_config


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_loads(name):
    cfg = load_config(name)
    ds = deepspeed_config(cfg, cfg.cluster.num_workers)  # the batch splits into whole micro-batches per worker
    b = cfg.batch
    assert ds["gradient_accumulation_steps"] >= 1 and ds["train_micro_batch_size_per_gpu"] == b.micro_batch_size
    assert ds["train_batch_size"] * b.seq_len == b.tokens_per_step
    assert cfg.model.n_embd % cfg.model.n_head == 0


def test_the_presets_exist_and_124m_is_the_llmc_recipe():
    assert {"base", "smoke", "gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"} <= set(preset_names())
    c = load_config("gpt2-124m")
    assert c.data.input == ["hf:HuggingFaceFW/fineweb-edu"] and c.data.hf_config == "sample-10BT"
    assert c.batch.tokens_per_step == 2**19 and c.train.lr == 6e-4 and c.train.warmup_steps == 715
    assert c.train.min_lr_ratio == 0.1 and c.train.max_steps == 19073
    assert c.deepspeed.precision == "bf16" and c.deepspeed.zero_stage == 1
    assert c.cluster.num_workers == 8 and c.cluster.use_gpu
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd) == (12, 12, 768)
    sizes = {n: load_config(n).model for n in ("gpt2-350m", "gpt2-774m", "gpt2-1558m")}
    assert [(m.n_layer, m.n_embd) for m in sizes.values()] == [(24, 1024), (36, 1280), (48, 1600)]
    assert load_config("gpt2-774m").deepspeed.zero_stage == 2 and load_config("gpt2-1558m").deepspeed.zero_stage == 3
    smoke = load_config("smoke")
    assert smoke.data.input == ["builtin"] and not smoke.cluster.use_gpu


@pytest.mark.parametrize("name", [n for n in preset_names() if n != "base"])
def test_presets_derive_from_a_parent_and_restate_nothing_it_already_says(name):
    raw = parse_yaml((PRESET_DIR / f"{name}.yaml").read_text())
    parent = _load_raw(raw.pop("extends"))  # every preset but base derives from another
    for section, values in raw.items():
        for key, value in values.items():
            assert parent.get(section, {}).get(key, object()) != value, f"{name}: {section}.{key} repeats its parent"


def test_dotted_overrides_are_typed():
    c = load_config("smoke", ["train.lr=3e-4", "model.n_layer=3", "data.input=[a.jsonl, b.jsonl]",
                              "tokenization.val_tokens=1000", "checkpoint.dir=s3://bucket/ckpt"])
    assert c.train.lr == 3e-4 and isinstance(c.train.lr, float)
    assert c.model.n_layer == 3 and c.data.input == ["a.jsonl", "b.jsonl"]
    assert c.tokenization.val_tokens == 1000 and c.checkpoint_dir == "s3://bucket/ckpt"
    assert load_config("smoke", ["tokenization.val_tokens="]).tokenization.val_tokens is None


@pytest.mark.parametrize("override, message", [
    ("trian.lr=1e-3", "unknown key 'trian' (did you mean 'train'?)"),
    ("train.lrr=1e-3", "unknown key 'train.lrr' (did you mean 'train.lr'?)"),
    ("train.lr=fast", "train.lr: Input should be a valid number"),
    ("train.max_steps=12.5", "train.max_steps: Input should be a valid integer"),
    ("train.max_steps='12'", "train.max_steps: Input should be a valid integer"),
    ("cluster.use_gpu=maybe", "cluster.use_gpu: Input should be a valid boolean"),
    ("deepspeed.precision=fp8", "deepspeed.precision: Input should be 'auto', 'bf16' or 'fp32'"),
    ("batch.micro_batch_size=24", "batch.tokens_per_step: (2048) must be a multiple of batch.micro_batch_size"),
    ("cluster.num_workers=3", "batch.tokens_per_step: (2048) must be a multiple"),
    ("model.n_head=3", "model.n_embd: (64) must be divisible by model.n_head (3)"),
    ("batch.seq_len=256", "batch.seq_len: (256) exceeds model.block_size (128)"),
    ("deepspeed.offload_params=true", "deepspeed.offload_params: needs deepspeed.zero_stage=3"),
    ("train.warmup_steps=100", "train.warmup_steps: (100) must be between 0 and train.max_steps (60)"),
    ("tokenization.val_fraction=1.5", "tokenization.val_fraction: must be in [0, 1)"),
    ("model.n_layer.x=1", "model.n_layer.x: 'n_layer' is not a section"),
    ("train.lr", "is not of the form section.key=value"),
    ("model.loss_impl=liger", "model.loss_impl: liger (Liger-Kernel's fused linear cross-entropy, Triton kernels) "
                              "runs on GPUs only; with cluster.use_gpu=false use model.loss_impl=chunked"),
    ("model.loss_impl=fused", "model.loss_impl: Input should be 'chunked' or 'liger'"),
    ("data.sources=[{name: Web, input: a.jsonl, weight: 1}]", "data.sources.0.name: 'Web' must be 1-32 lowercase"),
    ("data.sources=[{name: ../x, input: a.jsonl, weight: 1}]", "data.sources.0.name: '../x' must be"),
    ("data.sources=[{name: a, input: x, weight: 1}, {name: a, input: y, weight: 2}]",
     "data.sources.1.name: 'a' names two sources"),
    ("data.sources=[{name: a, input: x, weight: 0}]", "data.sources.0.weight: (0.0) must be a finite number > 0"),
    ("data.sources=[{name: a, input: x, weight: -1.5}]", "data.sources.0.weight: (-1.5) must be a finite number > 0"),
    ("data.sources=[{name: a, input: x, weight: .nan}]", "data.sources.0.weight: (nan) must be a finite number > 0"),
    ("data.sources=[{name: a, input: x, weight: .inf}]", "data.sources.0.weight: (inf) must be a finite number > 0"),
    ("data.sources=[{name: a, input: x, weight: 1, max_epochs: 0}]", "data.sources.0.max_epochs: (0.0) must be"),
    ("data.sources=[{name: a, input: [], weight: 1}]", "data.sources.0.input: source 'a' must name at least one"),
    ("data.sources=[{name: a, weight: 1}]", "data.sources.0.input: Field required"),
    ("data.sources=[{name: a, input: x, weight: 1, text_feld: body}]", "unknown key 'data.sources.0.text_feld'"),
])
def test_bad_config_is_rejected_naming_the_key(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("smoke", [override])
    assert message in str(err.value)


def test_data_sources_are_named_weighted_and_inherit_data_settings(tmp_path):
    web = "{name: web, input: web/*.jsonl, weight: 3}"
    books = "{name: books, input: [b1.txt, b2.txt], weight: 1, max_epochs: 2.5, text_unit: paragraph, hf_split: x}"
    c = load_config("smoke", [f"data.sources=[{web}, {books}]", "data.text_field=body"])
    assert [(s.name, s.weight, s.max_epochs) for s in c.data.sources] == [("web", 3.0, None), ("books", 1.0, 2.5)]
    (n1, d1), (n2, d2) = c.data.parts()
    assert (n1, d1.input, d1.text_field, d1.text_unit, d1.sources) == ("web", ["web/*.jsonl"], "body", "file", [])
    assert (n2, d2.input, d2.text_field, d2.text_unit, d2.hf_split) == ("books", ["b1.txt", "b2.txt"], "body",
                                                                         "paragraph", "x")
    assert c.data.parts() != load_config("smoke").data.parts() == [(None, load_config("smoke").data)]
    # data.input given too is refused, from the command line or a preset; data.input: [] clears a preset's
    for preset, extra in (("smoke", ["data.input=[a.jsonl]"]), ("gpt2-124m", [])):
        with pytest.raises(ConfigError, match="data.input: cannot be set together with data.sources"):
            load_config(preset, [*extra, f"data.sources=[{web}]"])
    fineweb = load_config("gpt2-124m", ["data.input=[]", f"data.sources=[{web}]"]).data.parts()[0][1]
    assert fineweb.input == ["web/*.jsonl"] and fineweb.hf_config == "sample-10BT"  # inherited from the preset
    # the README's example, over the preset it names
    example = (REPO / "README.md").read_text().split("### Mixing sources", 1)[1].split("```yaml\n", 1)[1].split("```")[0]
    (tmp_path / "mix.yaml").write_text(f"extends: gpt2-124m\n{example}")
    readme = load_config(str(tmp_path / "mix.yaml")).data
    assert [(s.name, s.weight, s.max_epochs) for s in readme.sources] == [("web", 0.8, None), ("books", 0.2, 4.0)]
    # --help-config lists a source's keys under <i>, then each configured source's values
    from pipeline.core.config import reference
    lines = reference(c).splitlines()
    assert any(line.startswith("data.sources.<i>.weight ") for line in lines)
    assert any(line.startswith("data.sources.1.max_epochs ") and " 2.5 " in line for line in lines)


def test_the_gpu_only_loss_head_is_accepted_on_gpus_and_chunked_is_the_default():
    assert load_config("smoke").model.loss_impl == load_config("gpt2-124m").model.loss_impl == "chunked"
    assert load_config("gpt2-124m", ["model.loss_impl=liger"]).model.loss_impl == "liger"
    assert load_config("smoke", ["model.loss_impl=liger", "cluster.use_gpu=true"]).model.loss_impl == "liger"


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(ConfigError, match="preset 'gpt2-125m' not found; presets: base, gpt2-124m"):
        load_config("gpt2-125m")
    own = tmp_path / "mine.yaml"
    own.write_text("extends: smoke\ntrain:\n  max_steps: 70\n")
    assert load_config(str(own)).train.max_steps == 70
    (tmp_path / "loop.yaml").write_text(f"extends: {tmp_path / 'loop.yaml'}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "loop.yaml"))


def test_config_round_trips_and_fingerprints_are_stable():
    c = load_config("gpt2-350m")
    assert load_config("base", [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}"
                                for k, v in c.flat().items() if v is not None]).model_dump() == c.model_dump()
    assert c.fingerprint("model") == load_config("gpt2-350m", ["train.lr=1e-4"]).fingerprint("model")
    assert c.fingerprint("train") != load_config("gpt2-350m", ["train.lr=1e-4"]).fingerprint("train")


def test_every_config_field_is_documented_where_it_is_declared():
    # config.py is the reference for presets: each field's doc is the string under it (a pydantic attribute
    # docstring), so code reads it (Model.model_fields[name].description, --help-config) and no field is bare
    import ast

    leaves = config_leaves()
    bare = [key for key, field in leaves.items() if not (field.description or "").strip()]
    assert not bare, f"config fields without a doc: {bare}"
    assert {"train.lr", "finetune.lr", "finetune.heads.<name>.weight", "eval.hellaswag"} <= set(leaves)
    assert "learning rate" in leaves["train.lr"].description
    # declared where they are documented: every annotated field in config.py is followed by its docstring,
    # and no field line still carries its doc as a trailing comment
    source = (PRESET_DIR.parent / "config.py").read_text()
    lines = source.splitlines()
    for cls in ast.parse(source).body:
        if isinstance(cls, ast.ClassDef):
            for node, after in zip(cls.body, [*cls.body[1:], None]):
                if isinstance(node, ast.AnnAssign) and "ClassVar" not in ast.unparse(node.annotation):
                    where = f"{cls.name}.{node.target.id}"
                    assert isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant), where
                    assert "#" not in lines[node.lineno - 1].split("=", 1)[-1], where


def test_train_and_finetune_share_one_typed_schedule():
    from pipeline.core.config import FinetuneConfig, Schedule, TrainConfig

    assert issubclass(TrainConfig, Schedule) and issubclass(FinetuneConfig, Schedule)
    c = load_config("base")
    assert (c.train.lr, c.train.warmup_steps, c.train.max_steps, c.train.weight_decay) == (6e-4, 715, 19073, 0.1)
    assert (c.finetune.lr, c.finetune.warmup_steps, c.finetune.max_steps, c.finetune.weight_decay) == (5e-5, 0, 1000, 0.0)
    assert Schedule().lr == 6e-4 and TrainConfig().max_steps == 19073 and FinetuneConfig().max_steps == 1000
    for key in ("lr", "warmup_steps", "max_steps", "weight_decay", "skip_steps", "max_bad_steps", "spike_factor",
                "spike_window"):  # typed and documented once
        train, finetune = TrainConfig.model_fields[key], FinetuneConfig.model_fields[key]
        assert train.annotation is finetune.annotation and train.description == finetune.description
        assert train.description == Schedule.model_fields[key].description
    for section in ("train", "finetune"):  # the same checks, naming each section's key
        with pytest.raises(ConfigError, match=f"{section}.warmup_steps: \\(5000\\) must be between 0 and {section}.max_steps"):
            load_config("base", [f"{section}.warmup_steps=5000", f"{section}.max_steps=100"])
        with pytest.raises(ConfigError, match=f"{section}.lr: must be positive"):
            load_config("base", [f"{section}.lr=0"])
        with pytest.raises(ConfigError, match=f"{section}.weight_decay: must be a finite number >= 0"):
            load_config("base", [f"{section}.weight_decay=-0.1"])
    assert load_config("base", ["finetune.lr=1e-3"]).train.lr == 6e-4
