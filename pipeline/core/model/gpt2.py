"""GPT-2, as OpenAI released it, in one file.

Learned token and position embeddings; n_layer pre-LayerNorm blocks (LN -> causal self-attention ->
dropout -> residual; LN -> 4x MLP with tanh-GELU -> dropout -> residual); a final LayerNorm; the LM head
tied to the token embedding. The vocabulary (50,257) may be padded to a multiple of 64 so the big
matmuls tile well; the padded logits are set to -inf, so they are never predicted and add no loss.

Shapes: B batch, T time, C n_embd, H n_head, D = C // H head size, V (padded) vocabulary.
No distributed code lives here: train/engine.py wraps this model for DeepSpeed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    block_size: int = 1024
    vocab_size: int = 50257
    pad_vocab_to: int = 64  # 1: no padding
    dropout: float = 0.0
    loss_impl: str = "chunked"  # the training loss head: "chunked" (ChunkedCrossEntropy) or "liger" (GPUs only)

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.pad_vocab_to) * self.pad_vocab_to


class KVCache:
    """Keys and values of every layer for the tokens seen so far, preallocated to max_len."""

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, config.n_head, max_len, config.n_embd // config.n_head)
        self.k = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled

    def reorder(self, index: torch.Tensor) -> None:
        """Keep the rows `index` (beam search re-ranks hypotheses between steps)."""
        self.k = [k.index_select(0, index) for k in self.k]
        self.v = [v.index_select(0, index) for v in self.v]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual = True  # scaled at init (see GPT._init_weights)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        causal = mask is None
        if mask is not None:
            mask = mask[:, None]  # (B, 1, T, T): one pattern for every head
        elif cache is not None:
            past = cache.length
            cache.k[layer][:, :, past:past + T] = k
            cache.v[layer][:, :, past:past + T] = v
            k, v = cache.k[layer][:, :, :past + T], cache.v[layer][:, :, :past + T]  # (B, H, past+T, D)
            if past:  # new queries see every cached position and the causal part of their own
                causal = False
                mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual = True
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, layer: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets, chunk_rows rows at a time.

    The full logits of a training micro-batch are large (gpt2-124m at 64 x 1024: 6.6 GB in bf16, 13 GB
    in fp32, more again for log-softmax and its gradient); here only one chunk of them exists at a time,
    in fp32. The gradients are computed in the same pass (softmax minus one-hot, over the count of
    targets that are not -1), so backward only scales them: nothing of the chunk is kept, and no
    second matmul recomputes it. The weight's gradient is accumulated over the chunks in fp32.
    """

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size: int, chunk_rows: int):  # x (N, C), weight (V, C), targets (N,)
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = targets != -1
        count = valid.sum().to(torch.float32)  # a tensor: no host sync
        loss = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if want_w else None
        for lo in range(0, x.shape[0], chunk_rows):
            xc, tc, vc = x[lo:lo + chunk_rows], targets[lo:lo + chunk_rows], valid[lo:lo + chunk_rows]
            logits = (xc @ weight.t()).float()  # (n, V): the one chunk of logits
            logits[:, vocab_size:] = float("-inf")  # padding rows are never predicted
            index = tc.clamp(min=0)[:, None]
            picked = logits.gather(1, index)[:, 0]
            top = logits.amax(dim=-1, keepdim=True)
            # log-sum-exp in place (torch.logsumexp would allocate a second chunk-sized tensor)
            total = logits.sub_(top).exp_().sum(dim=-1)
            loss += ((top[:, 0] + total.log() - picked) * vc).sum()
            if want_x or want_w:
                grad = logits.div_(total[:, None])  # softmax, still in the logits' memory
                grad.scatter_add_(1, index, -vc[:, None].to(grad.dtype))
                grad = grad.mul_(vc[:, None] / count).to(x.dtype)  # (n, V), in the dtype autograd would use
                if want_x:
                    grad_x[lo:lo + chunk_rows] = grad @ weight
                if want_w:
                    grad_w += grad.t() @ xc
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return (None if grad_x is None else grad_x * grad_loss.to(grad_x.dtype),
                None if grad_w is None else (grad_w * grad_loss).to(ctx.weight_dtype), None, None, None)


def liger_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same mean loss through Liger-Kernel's fused linear cross-entropy (Triton: GPUs only), for
    model.loss_impl=liger. It too chunks the rows and computes the gradients in the forward pass; its
    chunk is smaller (about N x C logits in all) and its logits stay in the model's dtype (the softmax
    is taken in fp32 inside its kernel). `weight` is the unpadded vocabulary's rows; the weight's
    gradient is accumulated in fp32, as ours is. Imported here, so that only this variant needs it."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy(x, weight, targets, ignore_index=-1, accum_dtype=torch.float32)


class LMHead(nn.Module):
    """The output layer: logits, or the loss computed chunk by chunk without the logits of the batch.
    A module of its own (not a bare use of the embedding) so that ZeRO-3 gathers its weight around it.
    config.loss_impl picks the loss: ours (ChunkedCrossEntropy) or Liger-Kernel's (liger_cross_entropy)."""

    def __init__(self, config: GPTConfig, chunk_rows: int = 4096):
        super().__init__()
        self.vocab_size, self.chunk_rows, self.loss_impl = config.vocab_size, chunk_rows, config.loss_impl
        self.weight = nn.Parameter(torch.empty(config.padded_vocab_size, config.n_embd))  # tied by GPT

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is not None:  # x (B, T, C), targets (B, T) -> mean loss
            x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
            if self.loss_impl == "liger":  # the padding rows are left out: they are never predicted
                return liger_cross_entropy(x, self.weight[:self.vocab_size], targets)
            return ChunkedCrossEntropy.apply(x, self.weight, targets, self.vocab_size, self.chunk_rows)
        logits = F.linear(x, self.weight)  # (B, T, V)
        if logits.size(-1) > self.vocab_size:
            logits[..., self.vocab_size:] = float("-inf")  # padding rows are never predicted
        return logits


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # recompute each block in backward to save memory
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList(Block(config) for _ in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = LMHead(config)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "residual", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, embeddings: bool = True) -> int:
        """Parameters, tied ones once; without the position embedding if embeddings=False (as for FLOPs)."""
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.transformer.wpe.weight.numel()

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None, positions: torch.Tensor | None = None,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
        """The trunk: GPT-2 without its LM head. idx (B, T) -> the final LayerNorm's output (B, T, C),
        what task heads (pipeline/core/model/heads.py) and the LM head read."""
        B, T = idx.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            # Python ints: a tensor check here would block on the device every forward pass.
            if start + T > self.config.block_size:
                raise ValueError(f"position {start + T - 1} is beyond the context of {self.config.block_size}")
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        elif int(positions.max()) >= self.config.block_size:  # explicit positions come from eval only
            raise ValueError(f"position {int(positions.max())} is beyond the context of {self.config.block_size}")
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(positions))  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, i, mask)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx, targets: (B, T) token ids; targets of -1 are ignored. Returns (logits (B, T, V), None)
        without targets, and (None, mean cross-entropy) with them: the loss never materialises the
        logits of the whole batch (see LMHead).

        For scoring several continuations of one context in one sequence: positions (B, T) replaces
        0..T-1, mask (B, T, T) (True: may attend) replaces the causal mask, and logits_at (B, K)
        computes the logits only at those positions, giving (B, K, V).
        """
        x = self.hidden_states(idx, cache, positions, mask)
        if targets is not None:
            return None, self.lm_head(x, targets)
        if logits_at is not None:
            x = x.gather(1, logits_at[..., None].expand(-1, -1, x.size(-1)))  # (B, K, C)
        return self.lm_head(x), None


# --- Hugging Face GPT-2 checkpoints: config.json + model.safetensors ----------------------------------
# HF stores the four projection weights as Conv1D, (in, out): the transpose of nn.Linear's (out, in).

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_config(config: GPTConfig) -> dict:
    """A config.json that `transformers.GPT2LMHeadModel.from_pretrained` reads."""
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
            "n_positions": config.block_size, "n_ctx": config.block_size, "n_embd": config.n_embd,
            "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
            "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
            "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
            "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True,
            "scale_attn_weights": True, "use_cache": True}


def config_from_hf(hf: dict, pad_vocab_to: int = 64) -> GPTConfig:
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"config.json describes a {hf.get('model_type')!r} model, not 'gpt2'")
    unsupported = {k: hf[k] for k in ("n_inner", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn")
                   if hf.get(k)}
    if unsupported or hf.get("activation_function", "gelu_new") != "gelu_new":
        raise ValueError(f"config.json has GPT-2 variants this model does not implement: "
                         f"{unsupported or hf.get('activation_function')}")
    sizes = {key: hf.get(key) for key in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size")}
    for key, value in sizes.items():  # hostile input: checked before it sizes a tensor
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= 1 << 20:
            raise ValueError(f"config.json: {key} must be a positive integer (got {value!r:.40})")
    if sizes["n_embd"] % sizes["n_head"]:
        raise ValueError(f"config.json: n_embd ({sizes['n_embd']}) must be a multiple of n_head ({sizes['n_head']})")
    return GPTConfig(n_layer=sizes["n_layer"], n_head=sizes["n_head"], n_embd=sizes["n_embd"],
                     block_size=sizes["n_positions"], vocab_size=sizes["vocab_size"], pad_vocab_to=pad_vocab_to)


def to_hf_state_dict(state: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our state dict (any device/dtype) -> GPT2LMHeadModel's names, Conv1D layout, unpadded vocabulary."""
    out = {}
    for name, tensor in state.items():
        if name == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        t = tensor.detach()
        if name.endswith(_CONV1D):
            t = t.t()
        if name == "transformer.wte.weight":
            t = t[:config.vocab_size]
        out[name] = t.contiguous()
    return out


def from_hf_state_dict(hf: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel / GPT2Model tensors (with or without the `transformer.` prefix) -> ours."""
    out = {}
    for name, tensor in hf.items():
        if name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight":
            continue  # causal-mask buffers of old checkpoints; the tied head
        key = name if name.startswith("transformer.") else f"transformer.{name}"
        t = tensor.t() if key.endswith(_CONV1D) else tensor
        if key == "transformer.wte.weight" and config.padded_vocab_size > t.shape[0]:
            if t.shape[0] < config.vocab_size:  # padding rows are ours to add; a real token's row is not
                raise ValueError(f"config.json: vocab_size {config.vocab_size} exceeds the {t.shape[0]} rows "
                                 f"of the token embedding")
            t = torch.cat([t, t.new_zeros(config.padded_vocab_size - t.shape[0], t.shape[1])])
        out[key] = t.contiguous()
    out["lm_head.weight"] = out["transformer.wte.weight"]
    return out


def save_hf(model: GPT, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write config.json + model.safetensors that `transformers` opens as GPT2LMHeadModel.
    `state`: a consolidated state dict to write instead of the model's own (ZeRO partitions the model's)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = to_hf_state_dict(state if state is not None else model.state_dict(), model.config)
    save_file({k: v.float().cpu() for k, v in tensors.items()}, str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.config), indent=2) + "\n")


def from_state_dict(config: GPTConfig, state: dict[str, torch.Tensor], source: str | Path) -> GPT:
    """A GPT holding `state` (our names), after checking every tensor's name and shape against the
    model `config` describes; the error names `source` and what does not fit."""
    with torch.device("meta"):  # shapes only: the weights come from `state`
        model = GPT(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: found {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
             for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        problems = [f"mismatched: {', '.join(wrong[:5])}" if wrong else "",
                    f"missing: {', '.join(missing[:5])}" if missing else "",
                    f"unexpected: {', '.join(unexpected[:5])}" if unexpected else ""]
        raise ValueError(f"{source}: weights do not fit the model its config describes (n_layer={config.n_layer}, "
                         f"n_head={config.n_head}, n_embd={config.n_embd}, block_size={config.block_size}); "
                         + "; ".join(filter(None, problems)))
    model.load_state_dict({k: v.float() for k, v in state.items()}, assign=True)
    model.lm_head.weight = model.transformer.wte.weight  # assign=True gave the tied head its own Parameter
    return model


def load_hf(directory: str | Path, pad_vocab_to: int = 64) -> GPT:
    """A GPT from a Hugging Face GPT-2 directory: config.json with model.safetensors, or with
    pytorch_model.bin (read with weights_only=True: nothing in it can run code)."""
    directory = Path(directory)
    try:
        config = config_from_hf(json.loads((directory / "config.json").read_text()), pad_vocab_to)
    except (ValueError, KeyError) as err:
        raise ValueError(f"{directory / 'config.json'}: {err}") from None
    weights = directory / "model.safetensors"
    if weights.exists():
        from safetensors.torch import load_file

        hf = load_file(str(weights))
    else:
        weights = directory / "pytorch_model.bin"
        hf = torch.load(weights, map_location="cpu", weights_only=True)
    return from_state_dict(config, from_hf_state_dict(hf, config), weights)
