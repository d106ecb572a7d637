"""Text generation: greedy, temperature, top-k and top-p sampling, and beam search, with the KV cache.

The same seed gives the same text. Generation stops at <|endoftext|> or after max_new_tokens; the
prompt plus the new tokens must fit the model's context.
"""

from __future__ import annotations

import torch

from pipeline.core.command import UserError
from pipeline.core.model.gpt2 import GPT, KVCache
from tokenization.tokenizer import EOT


class GenerationError(UserError, ValueError):
    """A prompt or sampling setting the model cannot generate from; the message names the key."""


def _check_length(model: GPT, prompt: list[int], max_new_tokens: int) -> None:
    if not prompt:
        raise GenerationError("eval.prompts (--prompt): a prompt is empty")
    if len(prompt) >= model.config.block_size or max_new_tokens < 1:
        raise GenerationError(f"eval.prompts (--prompt): a prompt of {len(prompt)} tokens leaves no room for new "
                              f"tokens in the model's context of {model.config.block_size}")
    if len(prompt) + max_new_tokens > model.config.block_size:
        raise GenerationError(f"prompt ({len(prompt)} tokens) + eval.max_new_tokens ({max_new_tokens}) exceeds the "
                              f"model's context of {model.config.block_size}")


def _filter(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Logits (B, V) after temperature, top-k and nucleus filtering (removed entries are -inf)."""
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ordered, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(ordered, dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def sample(model: GPT, prompt: list[int], max_new_tokens: int, *, greedy: bool = False, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, num_samples: int = 1, seed: int = 0,
           use_cache: bool = True) -> list[list[int]]:
    """num_samples continuations of prompt (token ids, prompt excluded, stopped at <|endoftext|>)."""
    _check_length(model, prompt, max_new_tokens)
    if not greedy and temperature <= 0:
        raise GenerationError("eval.temperature: must be positive (or use greedy decoding, eval.greedy)")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([prompt] * num_samples, device=device)
    cache = KVCache(model.config, num_samples, len(prompt) + max_new_tokens, device,
                    next(model.parameters()).dtype) if use_cache else None
    logits = model(idx, cache=cache)[0][:, -1]
    out = torch.empty(num_samples, 0, dtype=torch.long, device=device)
    done = torch.zeros(num_samples, dtype=torch.bool, device=device)
    for _ in range(max_new_tokens):
        logits = logits[:, :model.config.vocab_size].float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            probs = torch.softmax(_filter(logits, temperature, top_k, top_p), dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, EOT), nxt)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= nxt == EOT
        if done.all():
            break
        step_input = nxt[:, None] if use_cache else torch.cat([idx, out], dim=1)
        logits = model(step_input, cache=cache)[0][:, -1]
    return [_until_eot(row) for row in out.tolist()]


@torch.no_grad()
def beam_search(model: GPT, prompt: list[int], max_new_tokens: int, num_beams: int = 4,
                length_penalty: float = 1.0) -> list[int]:
    """The best continuation found by beam search, scored as summed log-probability divided by
    (generated length) ** length_penalty. As in Hugging Face's: an <|endoftext|> candidate finishes a
    hypothesis only if it ranks within the beam width, and the search stops once num_beams
    hypotheses are finished. With num_beams=1 this is greedy decoding."""
    _check_length(model, prompt, max_new_tokens)
    model.eval()
    device = next(model.parameters()).device
    cache = KVCache(model.config, 1, len(prompt) + max_new_tokens, device, next(model.parameters()).dtype)
    logits = model(torch.tensor([prompt], device=device), cache=cache)[0][:, -1]
    beams = torch.empty(1, 0, dtype=torch.long, device=device)  # (beams, generated so far)
    scores = torch.zeros(1, device=device)  # summed log-probabilities per beam
    finished: list[tuple[float, list[int]]] = []
    for step in range(max_new_tokens):
        logprobs = torch.log_softmax(logits[:, :model.config.vocab_size].float(), dim=-1)
        top = torch.topk((scores[:, None] + logprobs).view(-1), 2 * num_beams)
        keep_beam, keep_token, keep_score = [], [], []
        for rank, (value, flat) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            beam, token = divmod(flat, logprobs.size(-1))
            if token == EOT:
                if rank < num_beams:
                    finished.append((value / max(1, step) ** length_penalty, beams[beam].tolist()))
                continue
            keep_beam.append(beam)
            keep_token.append(token)
            keep_score.append(value)
            if len(keep_beam) == num_beams:
                break
        if len(finished) >= num_beams:
            break
        index = torch.tensor(keep_beam, device=device)
        beams = torch.cat([beams[index], torch.tensor(keep_token, device=device)[:, None]], dim=1)
        scores = torch.tensor(keep_score, device=device)
        if step < max_new_tokens - 1:
            cache.reorder(index)  # each surviving beam continues from its parent's keys and values
            logits = model(beams[:, -1:], cache=cache)[0][:, -1]
    else:
        finished += [(s / beams.size(1) ** length_penalty, b) for s, b in zip(scores.tolist(), beams.tolist())]
    return max(finished, key=lambda f: f[0])[1]


def _until_eot(tokens: list[int]) -> list[int]:
    return tokens[:tokens.index(EOT)] if EOT in tokens else tokens
