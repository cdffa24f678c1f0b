"""Tiny Qwen2.5-VL models built from configs, with a local char-level tokenizer and an image-only processor.

Nothing is downloaded. The tokenizer has one token per character of a small alphabet plus the chat and
vision special tokens Qwen2.5-VL expects (``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``,
``<|video_pad|>``). The processor is transformers' ``Qwen2_5_VLProcessor`` without its video processor:
the stock class type-checks a video processor even when it is None, and the video processor needs
torchvision, which does not load against the CPU torch here (docs/vision.md).

Inputs the processor returns for a batch of rendered prompts and one image per prompt:
``input_ids`` / ``attention_mask`` (B, T) left-padded, ``pixel_values`` (sum of patches, 3*2*14*14)
flat over the batch in image order, ``image_grid_thw`` (n_images, 3), ``mm_token_type_ids`` (B, T)
(1 on image tokens). Pass ``mm_token_type_ids`` to every forward: without it Qwen2.5-VL silently falls
back to 1-D positions (tests/test_vision_positions.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration

PAD, IM_START, IM_END, UNK = "<pad>", "<|im_start|>", "<|im_end|>", "<unk>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
RESERVED_TOKENS = (PAD, IM_START, IM_END, UNK, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
# Tokens a policy must never sample: the vision placeholders (an image pad in a completion breaks the next
# forced pass: "Image features and image tokens do not match") and the structural specials.
NEVER_SAMPLED = (PAD, IM_START, UNK, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789+-*=;:,.? "

# One user turn -> "<|im_start|>user:<image><text><|im_end|><|im_start|>assistant:". No newlines: the
# char-level pre-tokenizer splits on single characters and keeps the template short.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}:"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}"
)

IMAGE_SIDE = 56  # the demo's images; min = max pixels pins every image to 4x4 patches -> 2x2 = 4 image tokens


def build_vlm_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A char-level tokenizer (specials first, then ``alphabet``) with Qwen2.5-VL's vision tokens.

    ``<|im_end|>`` is eos (ends every completion); padding is on the left for batched generation.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    if any(len(c) != 1 or c in "\n\t\r" for c in chars):
        raise ValueError(f"alphabet must be single printable characters, got {alphabet!r}")
    vocab = {tok: i for i, tok in enumerate([*RESERVED_TOKENS, *chars])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=IM_END, unk_token=UNK, padding_side="left",
        model_max_length=512, additional_special_tokens=[IM_START, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_image_processor(side: int = IMAGE_SIDE):
    """``Qwen2VLImageProcessorPil`` (no torchvision) resizing every image to ``side`` x ``side`` (a multiple of 28)."""
    from transformers import Qwen2VLImageProcessorPil  # the torchvision-free backend

    if side % 28:
        raise ValueError(f"side must be a multiple of patch 14 x merge 2 = 28, got {side}")
    return Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side, patch_size=14, merge_size=2,
                                 temporal_patch_size=2)


def _processor_class():
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """``Qwen2_5_VLProcessor`` without a video processor (so without torchvision).

        ``ProcessorMixin`` takes its sub-processor attributes from the ``__init__`` signature, so leaving
        ``video_processor`` out of it drops the video part from construction, saving and loading; the
        parent still expands ``<|image_pad|>`` by ``image_grid_thw`` and returns ``mm_token_type_ids``.
        """

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                             chat_template=chat_template, **kwargs)

    return ImageOnlyQwen2_5_VLProcessor


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None, side: int = IMAGE_SIDE):
    """The image-only Qwen2.5-VL processor over ``tokenizer`` (default: ``build_vlm_tokenizer()``)."""
    tokenizer = tokenizer if tokenizer is not None else build_vlm_tokenizer()
    return _processor_class()(image_processor=build_image_processor(side), tokenizer=tokenizer,
                              chat_template=tokenizer.chat_template)


def build_tiny_vlm(tokenizer: PreTrainedTokenizerFast, *, hidden: int = 32, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate: int | None = None, vision_hidden: int = 32,
                   vision_depth: int = 1, vision_heads: int = 2, seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """A randomly initialised Qwen2.5-VL sized for the char-level demo (tied embeddings, short context).

    The mrope sections split the rotary half-dimension ``head_dim / 2`` over (temporal, height, width)
    in Qwen's 1:1.5:1.5 proportion (the released 128-dim heads use [16, 24, 24]).
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden {hidden} must divide by heads {heads}, and heads by kv_heads {kv_heads}")
    head_dim = hidden // heads
    if head_dim % 8:
        raise ValueError(f"head_dim = hidden / heads must be a multiple of 8 for mrope, got {head_dim}")
    half = head_dim // 2
    temporal = half // 4
    height = (half - temporal) // 2
    mrope_section = [temporal, height, half - temporal - height]  # sums to head_dim / 2
    ids = tokenizer.convert_tokens_to_ids
    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": intermediate or 4 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 512, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                                                "mrope_section": mrope_section},
            "bos_token_id": None, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
            "tie_word_embeddings": True,
        },
        vision_config={
            "depth": vision_depth, "hidden_size": vision_hidden, "intermediate_size": 2 * vision_hidden,
            "num_heads": vision_heads, "out_hidden_size": hidden, "patch_size": 14, "spatial_merge_size": 2,
            "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [vision_depth - 1],
        },
        image_token_id=ids(IMAGE_PAD), video_token_id=ids(VIDEO_PAD), vision_start_token_id=ids(VISION_START),
        vision_end_token_id=ids(VISION_END), tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    check_vlm_config(model)
    return model


def check_vlm_config(model: Qwen2_5_VLForConditionalGeneration) -> None:
    """Raise ValueError if the mrope sections do not sum to head_dim / 2 (rotary would silently misalign)."""
    text = model.config.text_config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    section = text.rope_parameters["mrope_section"]
    if sum(section) * 2 != head_dim:
        raise ValueError(f"mrope_section {section} sums to {sum(section)}, expected head_dim / 2 = {head_dim // 2}")


def never_sampled_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Token ids to pass as ``suppress_tokens`` to ``generate`` (vision placeholders, pad, im_start, unk)."""
    return tokenizer.convert_tokens_to_ids(list(NEVER_SAMPLED))


def save_vlm(model: Qwen2_5_VLForConditionalGeneration, processor, out: str | Path, *,
             max_new_tokens: int = 64, dtype: torch.dtype = torch.float32) -> None:
    """``save_pretrained`` of the model (in ``dtype``), the processor (tokenizer, image processor, chat
    template) and a greedy generation config that suppresses the never-sampled tokens."""
    from transformers import GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = processor.tokenizer
    model.generation_config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, suppress_tokens=never_sampled_ids(tokenizer),
    )
    original = next(model.parameters()).dtype
    model.to(dtype).save_pretrained(out)
    model.to(original)
    processor.save_pretrained(out)


def load_vlm(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) saved by ``save_vlm``; the processor is the image-only one (no torchvision)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    check_vlm_config(model)
    processor = _processor_class().from_pretrained(path)
    return model, processor


def pixel_values_per_image(pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split the flat ``pixel_values`` (sum of patches, C*t*p*p) into one (t*h*w, C*t*p*p) block per image.

    Image i owns ``image_grid_thw[i].prod()`` consecutive rows, in the order its placeholder appears in the
    batch. Select or micro-batch rows of a batch by re-joining these blocks (``torch.cat``), never by slicing
    ``pixel_values`` at batch positions.
    """
    return torch.split(pixel_values, image_grid_thw.prod(dim=-1).tolist())


def forced_inputs(prompt: dict[str, torch.Tensor], completion_ids: torch.Tensor,
                  completion_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Model kwargs for a teacher-forced pass over prompt + completion with generate()'s 3-D positions.

    ``prompt`` is what the processor returned for the left-padded prompts (``input_ids``, ``attention_mask``,
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``); ``completion_ids`` / ``completion_mask``
    are (B, N). ``mm_token_type_ids`` is extended with zeros (text) over the completion: without it the model
    silently uses 1-D positions. No KV cache: the whole sequence is one pass.
    """
    if "mm_token_type_ids" not in prompt:
        raise KeyError("prompt lacks mm_token_type_ids: Qwen-VL would silently fall back to 1-D positions")
    return {
        "input_ids": torch.cat([prompt["input_ids"], completion_ids], dim=1),  # (B, P + N)
        "attention_mask": torch.cat([prompt["attention_mask"], completion_mask.to(prompt["attention_mask"].dtype)],
                                    dim=1),
        "mm_token_type_ids": torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1),
        "pixel_values": prompt["pixel_values"],
        "image_grid_thw": prompt["image_grid_thw"],
        "use_cache": False,
    }
