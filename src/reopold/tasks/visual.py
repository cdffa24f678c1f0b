"""Add two numbers read from an image, with a step-by-step scratchpad: the bundled visual demo task.

Each problem is a 56x56 RGB image showing two 2-digit numbers, one per row, every digit a fixed 5x7
bitmap glyph scaled 3x and drawn into its own 28x28 cell (jittered by up to 2 pixels, random dark ink on
a random light background). The prompt text is the same for every problem, so only the image
determines the answer. A gold completion first transcribes the numbers, then adds units and tens
separately and combines them, then gives the answer after a colon:

    image shows 47 over 36  ->  47+36=7+6=13;40+30=70;70+13=83:83

With the vision processor of ``reopold.models.vision`` (patch 14, merge 2) a 28x28 cell is exactly one
image token, so the image is 4 tokens: the two digits of the top number, then the two of the bottom one.

Splits are a fixed function of the unordered pair of numbers (a stable hash, as in
``reopold.tasks.arithmetic``), so train, validation and test never share a pair, not even as ``a+b``
versus ``b+a``. Only the final answer is checked.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from reopold.tasks.arithmetic import SPLITS, hashed_split
from reopold.tasks.prompts import PromptTask, load_records

CELL = 28  # pixels per digit cell = one image token (patch 14 x spatial merge 2)
SCALE = 3  # glyph pixel -> SCALE x SCALE image pixels (5x7 glyph -> 15x21)
JITTER = 2  # max glyph offset from the cell centre, in pixels, each axis

# 5x7 bitmap digits, one string per row ("#" = ink).
GLYPHS = {
    "0": (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    "1": ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    "2": (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    "3": ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    "4": ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    "5": ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    "6": ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    "7": ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    "8": (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    "9": (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
}
_GLYPH_ARRAYS = {d: np.array([[c == "#" for c in row] for row in rows]) for d, rows in GLYPHS.items()}  # (7, 5)

_ANSWER = re.compile(r"^[0-9+=;]*:(0|[1-9][0-9]*)$")
PROMPT = "add the numbers"


@dataclass(frozen=True, eq=False)
class VisualProblem:
    """One task instance: the image, the prompt text shown beside it, and the exact final answer."""

    image: np.ndarray  # (56, 56, 3) uint8, RGB
    prompt: str  # the user text after the image (the same for every problem)
    answer: str  # e.g. "83"
    numbers: tuple[int, int]  # (top, bottom), for building gold scratchpads and for debugging


def _split_of(a: int, b: int) -> str:
    """Which split the unordered pair {a, b} belongs to (stable across runs and machines)."""
    lo, hi = min(a, b), max(a, b)
    return hashed_split(f"visual:{lo}+{hi}")


def draw_numbers(top: int, bottom: int, rng: random.Random) -> np.ndarray:
    """A (56, 56, 3) uint8 image: ``top`` in the upper row of cells, ``bottom`` in the lower one."""
    background = [rng.randint(170, 255) for _ in range(3)]
    ink = [rng.randint(0, 90) for _ in range(3)]
    image = np.empty((2 * CELL, 2 * CELL, 3), dtype=np.uint8)
    image[:] = background
    for row, number in enumerate((top, bottom)):
        for col, digit in enumerate(f"{number:02d}"):
            glyph = _GLYPH_ARRAYS[digit].repeat(SCALE, 0).repeat(SCALE, 1)  # (21, 15)
            gh, gw = glyph.shape
            y = row * CELL + (CELL - gh) // 2 + rng.randint(-JITTER, JITTER)
            x = col * CELL + (CELL - gw) // 2 + rng.randint(-JITTER, JITTER)
            image[y:y + gh, x:x + gw][glyph] = ink
    return image


class VisualAdditionTask:
    """Read two 2-digit numbers (10-99) from a 56x56 image and add them with a scratchpad."""

    name = "visual-addition"

    def __init__(self) -> None:
        self.alphabet = "0123456789+=;:"  # every character a completion can contain

    def __repr__(self) -> str:
        return "VisualAdditionTask()"

    @classmethod
    def from_config(cls, data) -> VisualAdditionTask:
        """The task takes no settings from the config's data section."""
        return cls()

    # ---- problems -------------------------------------------------------------------------------------
    def make_problem(self, top: int, bottom: int, rng: random.Random) -> VisualProblem:
        """The problem showing ``top`` over ``bottom``, drawn with colours and jitter from ``rng``."""
        if not (10 <= top <= 99 and 10 <= bottom <= 99):
            raise ValueError(f"numbers must be in [10, 99], got {top}, {bottom}")
        return VisualProblem(image=draw_numbers(top, bottom, rng), prompt=PROMPT, answer=str(top + bottom),
                             numbers=(top, bottom))

    def sample_problem(self, rng: random.Random, split: str = "train") -> VisualProblem:
        """One random problem of ``split`` (with replacement; for streaming training data)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if _split_of(a, b) == split:
                return self.make_problem(a, b, rng)

    def problems(self, split: str, n: int) -> list[VisualProblem]:
        """The first ``n`` distinct problems of ``split`` (a fixed, seeded order: same call, same list).

        Raises ValueError for an unknown split or when ``n`` exceeds the split's number of ordered pairs.
        """
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pairs = [(a, b) for a in range(10, 100) for b in range(10, 100) if _split_of(a, b) == split]
        if n > len(pairs):
            raise ValueError(f"n={n} is too many for split {split!r} (it has {len(pairs)} problems)")
        rng = random.Random(f"{self.name}-{split}")
        rng.shuffle(pairs)
        return [self.make_problem(a, b, rng) for a, b in pairs[:n]]

    def max_completion_chars(self) -> int:
        """An upper bound on the length of any gold completion (for ``max_new_tokens``)."""
        return len(self.solution(VisualProblem(image=np.zeros((1, 1, 3), np.uint8), prompt=PROMPT,
                                               answer="198", numbers=(99, 99))))

    def messages(self, problem: VisualProblem) -> list[dict]:
        """The chat messages of ``problem``: one user turn, the image then the prompt text."""
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": problem.prompt}]}]

    # ---- gold solutions -------------------------------------------------------------------------------
    def solution(self, problem: VisualProblem) -> str:
        """The gold completion (text after the prompt, without eos): transcribe, units, tens, combine."""
        a, b = problem.numbers
        units, tens = a % 10 + b % 10, (a // 10 + b // 10) * 10
        steps = [f"{a % 10}+{b % 10}={units}", f"{a // 10 * 10}+{b // 10 * 10}={tens}", f"{tens}+{units}={a + b}"]
        return f"{a}+{b}=" + ";".join(steps) + f":{a + b}"

    # ---- checking -------------------------------------------------------------------------------------
    def parse_answer(self, completion: str) -> str | None:
        """The final answer of a completion, or None when it is malformed (same rule as arithmetic)."""
        m = _ANSWER.fullmatch(completion.strip())
        return m.group(1) if m else None

    def check(self, problem: VisualProblem, completion: str) -> bool:
        """Exact final-answer match (the scratchpad itself is not graded)."""
        return self.parse_answer(completion) == problem.answer


def problem_images(problem) -> list:
    """The images of an image problem: ``problem.images`` (a list) or ``problem.image`` (one), each an array, a
    PIL image, a file path, or a datasets ``{"bytes": ..., "path": ...}`` dict (files are opened here)."""
    images = getattr(problem, "images", None)
    if images is None:
        image = getattr(problem, "image", None)
        images = [] if image is None else [image]
    return [_open_image(image) for image in images]


def _open_image(image):
    if isinstance(image, (str, bytes)) or hasattr(image, "__fspath__") or isinstance(image, dict):
        import io

        from PIL import Image

        if isinstance(image, dict):
            image = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        elif isinstance(image, bytes):
            image = io.BytesIO(image)
        return Image.open(image).convert("RGB")
    if hasattr(image, "convert"):  # a PIL image
        return image.convert("RGB")
    return image


@dataclass(frozen=True, eq=False)
class ImageProblem:
    """A prompt with images and an optional reference answer, read from a file (``ImagePromptTask``)."""

    prompt: str
    answer: str | None
    images: tuple  # paths (opened when rendered), PIL images, arrays, or datasets image dicts


class ImagePromptTask(PromptTask):
    """Image prompts from a JSONL file or a dataset saved with ``save_to_disk``: each row holds the prompt text
    (``data.prompt_key``), one image or a list of them (``data.image_key``: file paths, relative to a JSONL file's
    folder, or a datasets Image column) and the reference answer (``data.answer_key``). ``<image>`` markers in
    the text are removed: the images go before the text. Answers are graded like ``data.task=prompts``."""

    name = "image-prompts"

    def __init__(self, path: str, *, prompt_key: str = "prompt", answer_key: str = "answer",
                 image_key: str = "images", held_out: int = 1000, checker: str = "exact"):
        if checker == "math":
            from reopold.tasks.checkers import MathChecker

            self._math = MathChecker()  # fails here, before any model loads, when math-verify is missing
        else:
            self._math = None
        folder = Path(path).expanduser().parent
        problems = []
        for number, record in enumerate(load_records(path, prompt_key=prompt_key), start=1):
            images = record.get(image_key)
            if images is None or images == []:
                raise ValueError(f"{path}: row {number} has no image under {image_key!r} (set data.image_key)")
            images = images if isinstance(images, list) else [images]
            images = tuple(str(folder / i) if isinstance(i, str) and not Path(i).is_absolute() else i for i in images)
            answer = record.get(answer_key)
            text = record[prompt_key].replace("<image>", "").strip()
            problems.append(ImageProblem(text, None if answer is None else str(answer), images))
        order = list(range(len(problems)))
        random.Random(0).shuffle(order)  # a fixed held-out set, independent of the run's seed
        held = min(held_out, len(problems) // 10)
        self._splits = {"test": [problems[i] for i in order[:held]], "validation": [problems[i] for i in order[:held]],
                        "train": [problems[i] for i in order[held:]]}

    @classmethod
    def from_config(cls, data) -> ImagePromptTask:
        return cls(data.prompts, prompt_key=data.prompt_key, answer_key=data.answer_key, image_key=data.image_key,
                   held_out=data.eval_problems, checker=data.checker)


def problem_messages(problem) -> list[dict]:
    """One user turn: the problem's images, then its prompt text (``problem.messages`` when it has its own)."""
    content = [{"type": "image"} for _ in problem_images(problem)] + [{"type": "text", "text": problem.prompt}]
    return [{"role": "user", "content": content}]


VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_pad|>",
                 "<image>", "<video>", "<|image|>", "<|video|>")


class PromptTooLong(ValueError):
    """An image prompt longer than the limit: image placeholder tokens are never cut."""


class VisionPromptEncoder:
    """Image problems -> the processor's inputs for a left-padded batch (ids, mask and the ``ImageInputs``).

    The chat template is rendered with one image placeholder per image; the processor expands each into the
    image's tokens. A prompt longer than ``max_prompt_tokens`` is refused (``PromptTooLong``), never cut: a cut
    placeholder run makes Qwen-VL fail with "Image features and image tokens do not match", or worse, pairs
    images with the wrong tokens. ``__call__(text)`` encodes a text-only prompt with the same template.
    """

    multimodal = True

    def __init__(self, processor, *, max_prompt_tokens: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_prompt_tokens = max_prompt_tokens
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(getattr(processor, "image_token", "<|image_pad|>"))

    @property
    def never_sampled(self) -> list[int]:
        """Ids the sampler must suppress: the vision placeholders (a sampled one breaks the next forced pass), and
        the pad token when it is not EOS."""
        vocab = self.tokenizer.get_vocab()
        ids = {vocab[t] for t in VISION_TOKENS if t in vocab} | {self.image_token_id}
        for name in ("<|im_start|>", "<unk>"):
            if name in vocab:
                ids.add(vocab[name])
        pad = self.tokenizer.pad_token_id
        if pad is not None and pad != self.tokenizer.eos_token_id:
            ids.add(pad)
        return sorted(ids)

    def __call__(self, prompt: str) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def lengths(self, problems: list) -> list[int]:
        """Prompt tokens of each problem, image tokens included."""
        return [int(n) for start in range(0, len(problems), 256)
                for n in self.batch(problems[start : start + 256], check=False)[1].sum(-1).tolist()]

    def batch(self, problems: list, *, check: bool = True):
        """(input_ids (B, P), attention_mask (B, P), ImageInputs) of ``problems``, left-padded."""
        from reopold.rollout.batch import ImageInputs

        texts = [self.processor.apply_chat_template(getattr(p, "messages", None) or problem_messages(p),
                                                    add_generation_prompt=True, tokenize=False) for p in problems]
        images = [image for p in problems for image in problem_images(p)]
        enc = self.processor(text=texts, images=images or None, return_tensors="pt", padding=True)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        if check and self.max_prompt_tokens is not None:
            lengths = mask.sum(-1)
            too_long = int((lengths > self.max_prompt_tokens).sum())
            if too_long:
                raise PromptTooLong(
                    f"{too_long} of {len(problems)} image prompts are longer than {self.max_prompt_tokens} tokens "
                    f"(longest {int(lengths.max())}); image tokens are never cut: raise the limit or drop them "
                    "(VisionPromptEncoder.keep_fitting)")
        counts = torch.tensor([len(problem_images(p)) for p in problems], dtype=torch.long)
        if "pixel_values" in enc:
            pixel_values, grid = enc["pixel_values"], enc["image_grid_thw"]
        else:
            pixel_values, grid = torch.zeros((0, 0)), torch.zeros((0, 3), dtype=torch.long)
        types = enc.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).long()
        return ids, mask, ImageInputs(pixel_values, grid, counts, types)

    def keep_fitting(self, problems: list) -> tuple[list, int]:
        """(the problems whose prompts fit ``max_prompt_tokens``, how many were dropped)."""
        if self.max_prompt_tokens is None:
            return list(problems), 0
        kept = [p for p, n in zip(problems, self.lengths(problems), strict=True) if n <= self.max_prompt_tokens]
        return kept, len(problems) - len(kept)
