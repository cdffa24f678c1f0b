"""Log-prob of the sampled token and entropy of the full next-token distribution, chunk by chunk.

At a 150K vocabulary and 8K-token answers, one float32 (tokens x vocab) matrix is 4.9 GB per sequence, so it is
never built for the whole batch: rows are processed ``chunk_size`` at a time, and each chunk is recomputed in the
backward pass (activation checkpointing) instead of being kept alive until then. From hidden states the logits
themselves are only ever built one chunk at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_stats(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float, with_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
    log_probs = torch.log_softmax(logits.to(dtype) / temperature, dim=-1)  # (n, V)
    selected = log_probs.gather(-1, tokens[:, None]).squeeze(-1)  # (n,)
    if not with_entropy:
        return selected, torch.zeros_like(selected)
    return selected, -(log_probs.exp() * log_probs).sum(dim=-1)


def _hidden_chunk_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float,
    with_entropy: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.nn.functional.linear(hidden, weight, bias)  # (n, V), only this chunk
    return _chunk_stats(logits, tokens, temperature, with_entropy)


def _check(tokens: torch.Tensor, leading: torch.Size, temperature: float, chunk_size: int) -> None:
    if tokens.shape != leading:
        raise ValueError(f"tokens has shape {tuple(tokens.shape)}; expected {tuple(leading)} to match the inputs")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got temperature={temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got chunk_size={chunk_size}")


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of ``tokens`` under softmax(logits / temperature) and the entropy of that distribution.

    Use the sampling temperature: scoring at another temperature than the one that sampled is a known bug class.

    Args:
        logits: (B, T, V) next-token logits aligned with ``tokens`` (logits[:, t] predicts tokens[:, t]).
        tokens: (B, T) sampled token ids; padding positions must hold any valid id (e.g. the pad id).

    Returns:
        logprobs (B, T) float32, entropy (B, T) float32 or None.
    """
    _check(tokens, logits.shape[:-1], temperature, chunk_size)
    flat_logits = logits.reshape(-1, logits.shape[-1])  # (B*T, V)
    flat_tokens = tokens.reshape(-1)
    selected, entropy = [], []
    for start in range(0, flat_tokens.numel(), chunk_size):
        chunk = (flat_logits[start : start + chunk_size], flat_tokens[start : start + chunk_size])
        if torch.is_grad_enabled() and logits.requires_grad:
            out = checkpoint(_chunk_stats, *chunk, temperature, with_entropy, use_reentrant=False)
        else:
            out = _chunk_stats(*chunk, temperature, with_entropy)
        selected.append(out[0])
        entropy.append(out[1])
    logprobs = torch.cat(selected).view(tokens.shape)
    return logprobs, (torch.cat(entropy).view(tokens.shape) if with_entropy else None)


def sampled_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """(B, T) log-prob of each sampled token under softmax(logits / temperature); see logprobs_and_entropy."""
    return logprobs_and_entropy(logits, tokens, temperature=temperature, chunk_size=chunk_size, with_entropy=False)[0]


def entropy_from_logits(
    logits: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> torch.Tensor:
    """(B, T) entropy of softmax(logits / temperature), chunked."""
    tokens = torch.zeros(logits.shape[:-1], dtype=torch.long, device=logits.device)
    return logprobs_and_entropy(logits, tokens, temperature=temperature, chunk_size=chunk_size)[1]


def logprobs_from_hidden(
    hidden: torch.Tensor,
    lm_head_weight: torch.Tensor,
    tokens: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = True,
    lm_head_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs and entropies straight from final hidden states, never holding all (B*T, V) logits at once.

    Args:
        hidden: (B, T, D) final hidden states (after the last norm) at the positions that predict ``tokens``.
        lm_head_weight: (V, D) output projection; lm_head_bias: (V,) or None.
        tokens: (B, T) sampled token ids.

    Returns:
        logprobs (B, T) float32, entropy (B, T) float32 or None; same values and gradients as
        ``logprobs_and_entropy(hidden @ lm_head_weight.T, tokens)``.
    """
    _check(tokens, hidden.shape[:-1], temperature, chunk_size)
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])  # (B*T, D)
    flat_tokens = tokens.reshape(-1)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    selected, entropy = [], []
    for start in range(0, flat_tokens.numel(), chunk_size):
        args = (
            flat_hidden[start : start + chunk_size], lm_head_weight, lm_head_bias,
            flat_tokens[start : start + chunk_size], temperature, with_entropy,
        )  # fmt: skip
        out = checkpoint(_hidden_chunk_stats, *args, use_reentrant=False) if needs_grad else _hidden_chunk_stats(*args)
        selected.append(out[0])
        entropy.append(out[1])
    logprobs = torch.cat(selected).view(tokens.shape)
    return logprobs, (torch.cat(entropy).view(tokens.shape) if with_entropy else None)
