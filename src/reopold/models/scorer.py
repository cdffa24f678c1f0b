"""Teacher-forced scoring of responses: log-prob of each response token and the entropy of the model's full
next-token distribution at that position, computed chunk by chunk from the final hidden states.
"""

from __future__ import annotations

import torch

from reopold.core import logprobs_and_entropy, logprobs_from_hidden
from reopold.core.marginal import logprobs_and_cover
from reopold.rollout import Rollout


def plain_lm_head(lm) -> bool:
    """True when logits are exactly ``lm_head(final hidden)``; soft-capped or scaled logits need the slow path."""
    config = lm.config
    get = lambda key: getattr(config, key, None) or getattr(getattr(config, "text_config", None), key, None)
    return get("final_logit_softcapping") is None and get("logit_scale") in (None, 1.0) and hasattr(lm, "get_decoder")


def multimodal_backbone(lm):
    """The module of an image-text-to-text model that takes ``pixel_values`` and returns the final hidden states
    (``ForConditionalGeneration.model``; through a PEFT wrapper too)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return base.model


def _owned(t):
    """``t``, copied when it is a view: FSDP2's backward hooks on a root module's output are lost if a view is
    modified in place later (torch warns at every forward), so a sharded scorer never returns one."""
    return t.clone() if isinstance(t, torch.Tensor) and t._base is not None else t


def _is_fsdp2(module) -> bool:
    from torch.distributed.fsdp import FSDPModule  # fully_shard turns the module's class into a subclass of it

    return isinstance(module, FSDPModule)


class TokenScorer(torch.nn.Module):
    """Wraps a causal LM so that one forward pass returns response log-probs and entropies.

    It is a Module so accelerate/DDP can wrap it: the forward that computes the loss then goes through the wrapper
    and gradients are synchronised across ranks. ``self.lm`` stays the plain HF model for generate/save_pretrained.
    """

    def __init__(self, lm, *, temperature: float = 1.0, chunk_size: int = 1024):
        super().__init__()
        self.lm = lm
        self.temperature = temperature
        self.chunk_size = chunk_size

    @property
    def _no_split_modules(self):
        # accelerate's FSDP "TRANSFORMER_BASED_WRAP" shards each of these blocks (the decoder layers) as one unit.
        # The embeddings, final norm and LM head stay in the root unit, gathered for the whole forward: the chunked
        # log-prob path reads the head's weight directly, outside the head's own forward.
        return getattr(self.lm, "_no_split_modules", None)

    def forward(self, rollout: Rollout | None = None, with_entropy: bool = True, return_logits: bool = False,
                generate: dict | None = None, cover=None):
        """(logprobs (B, T), entropy (B, T) or None) of the response tokens; with ``return_logits`` the full
        (B, T, V) next-token logits at the response positions instead (for GKD).

        ``generate``: keyword arguments for ``self.lm.generate``, whose output is returned instead. Generation of
        a sharded (FSDP) student must run inside the root module's forward, where its weights are gathered (see
        reopold.train.distributed).

        ``cover``: ``reopold.core.marginal.Extensions`` of the model's vocabulary: (logprobs, cover) instead, the
        cover being the log-prob that the next token spells at least the given token's bytes (a teacher of another
        tokenizer than the student's, docs/cross_tokenizer.md).
        """
        if generate is not None:
            return self.lm.generate(**generate)
        out = self._score(rollout, with_entropy, return_logits, cover)
        if not _is_fsdp2(self):  # the copies (GKD: response logits) are only for FSDP2's hooks
            return out
        return tuple(_owned(t) for t in out) if isinstance(out, tuple) else _owned(out)

    def _score(self, rollout: Rollout, with_entropy: bool, return_logits: bool, cover=None):
        start, end = rollout.prompt_length - 1, rollout.input_ids.shape[1] - 1  # positions that predict responses
        tokens = rollout.completion_ids  # (B, T)
        inputs = {
            "input_ids": rollout.input_ids,
            "attention_mask": rollout.attention_mask,
            "position_ids": rollout.position_ids,
            "use_cache": False,  # teacher forcing needs no KV cache
        }
        if rollout.images is not None:
            # Image prompts: the model computes its own (3-D, Qwen-VL) positions from mm_token_type_ids, as
            # generate() did; 1-D position_ids would silently shift every token after an image.
            del inputs["position_ids"]
            inputs.update(rollout.images.forward_inputs(rollout.input_ids.shape[1]))
        if return_logits:
            return self.lm(**inputs).logits[:, start:end]
        if plain_lm_head(self.lm):
            # The backbone runs once over the whole sequence (image features are scattered into the embeddings);
            # only the output head is chunked.
            backbone = multimodal_backbone(self.lm) if rollout.images is not None else self.lm.get_decoder()
            hidden = backbone(**inputs).last_hidden_state[:, start:end]  # (B, T, D)
            head = self.lm.get_output_embeddings()
            if cover is not None:
                return logprobs_and_cover(hidden, tokens, cover, temperature=self.temperature,
                                          chunk_size=self.chunk_size, head_weight=head.weight, head_bias=head.bias)
            return logprobs_from_hidden(
                hidden, head.weight, tokens, temperature=self.temperature, chunk_size=self.chunk_size,
                with_entropy=with_entropy, lm_head_bias=head.bias,
            )  # fmt: skip
        logits = self.lm(**inputs).logits[:, start:end]  # (B, T, V)
        if cover is not None:
            return logprobs_and_cover(logits, tokens, cover, temperature=self.temperature, chunk_size=self.chunk_size)
        return logprobs_and_entropy(
            logits, tokens, temperature=self.temperature, chunk_size=self.chunk_size, with_entropy=with_entropy
        )
