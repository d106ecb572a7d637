"""GPT-2 against Hugging Face's GPT2LMHeadModel: same logits both ways, exact sizes, the KV cache."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from pipeline.core.config import ModelConfig
from pipeline.core.model.gpt2 import GPT, GPTConfig, KVCache, load_hf, save_hf

TINY = GPTConfig(n_layer=3, n_head=4, n_embd=64, block_size=48)


def test_the_pipeline_model_config_is_the_models_own():
    # the trainer builds GPTConfig(**cfg.model.model_dump()): the two must list the same fields and defaults
    ours = {name: f.default for name, f in GPTConfig.__dataclass_fields__.items()}
    assert ours == {name: f.default for name, f in ModelConfig.model_fields.items()}


def test_weights_that_do_not_fit_the_config_are_refused_by_name(tmp_path):
    save_hf(GPT(TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 96, "n_head": 4}))
    with pytest.raises(ValueError, match=r"model\.safetensors: weights do not fit.*transformer\.wte\.weight"):
        load_hf(tmp_path)


def test_our_model_saved_as_hf_gives_transformers_the_same_logits(tmp_path):
    torch.manual_seed(0)
    ours = GPT(TINY).eval()
    save_hf(ours, tmp_path)
    theirs = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, TINY.vocab_size, (2, 40))
    with torch.no_grad():
        a = ours(idx)[0][..., :TINY.vocab_size]
        b = theirs(idx).logits
    assert a.shape == b.shape == (2, 40, 50257)
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_an_hf_model_loaded_into_ours_gives_the_same_logits_and_loss(tmp_path):
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)).eval()
    hf.save_pretrained(tmp_path)  # GPT2LMHeadModel's own layout: Conv1D weights, tied head
    ours = load_hf(tmp_path).eval()
    idx = torch.randint(0, 50257, (3, 32))
    with torch.no_grad():
        out = hf(idx, labels=idx)
        logits, loss = ours(idx[:, :-1])[0], ours(idx[:, :-1], idx[:, 1:])[1]
    assert torch.allclose(logits[..., :50257], out.logits[:, :-1], atol=1e-5, rtol=0)
    assert abs(loss.item() - out.loss.item()) < 1e-5
    # the round trip writes back exactly the tensors it read
    save_hf(ours, tmp_path / "again")
    before, after = load_file(tmp_path / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    for name, tensor in after.items():
        key = name if name in before else name.removeprefix("transformer.")
        assert torch.equal(tensor, before[key]), name


def test_gpt2_small_has_exactly_124439808_parameters_and_the_sizes_match_openai():
    with torch.device("meta"):
        small = GPT(GPTConfig(pad_vocab_to=1))
        padded = GPT(GPTConfig())
        xl = GPT(GPTConfig(n_layer=48, n_head=25, n_embd=1600))
    assert small.num_params() == 124_439_808
    assert padded.transformer.wte.weight.shape == (50304, 768)
    assert small.lm_head.weight is small.transformer.wte.weight
    assert 1_557_000_000 < xl.num_params() < 1_560_000_000


def test_padded_vocabulary_is_never_predicted_and_adds_no_loss():
    torch.manual_seed(2)
    padded, plain = GPT(TINY), GPT(GPTConfig(**{**TINY.__dict__, "pad_vocab_to": 1}))
    state = padded.state_dict()
    state = {k: (v[:50257] if v.shape[:1] == (50304,) else v) for k, v in state.items()}
    plain.load_state_dict(state)
    idx = torch.randint(0, 50257, (2, 20))
    with torch.no_grad():
        (lp, _), (_, loss_p) = padded(idx), padded(idx, idx)
        _, loss_u = plain(idx, idx)
    assert torch.isinf(lp[..., 50257:]).all() and int(lp.argmax(-1).max()) < 50257
    assert torch.allclose(loss_p, loss_u, atol=1e-6)


def test_init_follows_gpt2_and_hf_config_is_readable(tmp_path):
    torch.manual_seed(3)
    model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=64))
    residual = model.transformer.h[0].attn.c_proj.weight.std().item()
    assert abs(model.transformer.h[0].attn.c_attn.weight.std().item() - 0.02) < 1e-3
    assert abs(residual - 0.02 / (2 * 12) ** 0.5) < 1e-3
    assert model.transformer.h[0].ln_1.bias.abs().sum() == 0
    save_hf(GPT(TINY), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["activation_function"] == "gelu_new" and config["vocab_size"] == 50257


def test_kv_cache_gives_the_logits_of_a_full_forward_pass():
    torch.manual_seed(4)
    model = GPT(TINY).eval()
    idx = torch.randint(0, 50257, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache(TINY, 2, 48, "cpu", torch.float32)
        parts = [model(idx[:, :17], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(17, 25)]
        parts.append(model(idx[:, 25:], cache=cache)[0])  # several new tokens on top of a filled cache
    cached = torch.cat(parts, dim=1)
    assert torch.allclose(cached[..., :50257], full[..., :50257], atol=1e-5)
    with pytest.raises(ValueError, match="beyond the context"):
        model(torch.zeros(1, 49, dtype=torch.long))


def full_logits_loss(model: GPT, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain computation the chunked loss replaces: every logit in fp32, then cross-entropy."""
    logits = model(idx)[0]
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def grads(model: GPT, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_chunked_loss_and_gradients_equal_the_full_logits_computation():
    torch.manual_seed(5)
    model = GPT(TINY)
    model.lm_head.chunk_rows = 7  # 2 x 30 rows: eight chunks, the last one short
    idx = torch.randint(0, 50257, (2, 30))
    targets = torch.randint(0, 50257, (2, 30))
    targets[0, :5] = -1  # ignored positions add nothing and do not count in the mean
    chunked = model(idx, targets)[1]
    plain = full_logits_loss(model, idx, targets)
    assert abs(chunked.item() - plain.item()) < 1e-6
    ours, reference = grads(model, chunked * 3), grads(model, plain * 3)  # a non-unit upstream gradient
    for name, g in reference.items():
        # fp32 rounding: sums of 60 rows in another order (AMD EPYC: up to 2.4e-6 on bias gradients of ~0.6)
        assert torch.allclose(ours[name], g, atol=1e-5, rtol=1e-5), name
    assert ours["transformer.wte.weight"][50257:].abs().sum() == 0  # padding rows learn nothing


def test_chunked_loss_and_gradients_equal_gpt2lmheadmodel_on_the_same_weights(tmp_path):
    torch.manual_seed(6)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=50257)).eval()
    hf.save_pretrained(tmp_path)  # eval(): no dropout; gradients still flow
    ours = load_hf(tmp_path).eval()
    ours.lm_head.chunk_rows = 16
    idx = torch.randint(0, 50257, (3, 32))
    theirs = hf(idx, labels=idx).loss  # HF shifts the labels itself
    mine = ours(idx[:, :-1], idx[:, 1:])[1]
    assert abs(mine.item() - theirs.item()) < 1e-5
    theirs.backward()
    mine.backward()
    hf_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        g = hf_grads[name].grad
        g = g.t() if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else g  # Conv1D layout
        assert torch.allclose(p.grad[:g.shape[0]], g, atol=1e-6, rtol=1e-4), name
