"""Image prompts with a crop tool: the agentic visual setting (Pixel-Reasoner's zoom-in) as a task.

``data.task: image-tool-prompts`` reads image prompts like ``image-prompts`` (a JSONL file or a saved dataset) and
runs each answer as an episode (docs/tools.md) whose one tool is ``crop_image``: the model names a region of an
image it has seen, and the crop comes back as an image observation it reads in its next turn. The call is written
in the chat template's ``<tool_call>`` JSON format, with Pixel-Reasoner's argument names:

    <tool_call>{"name": "crop_image", "arguments": {"bbox_2d": [x1, y1, x2, y2], "target_image": 1}}</tool_call>

A student must have been fine-tuned to write such calls (Pixel-Reasoner's SFT data teaches them); a student
trained on another tool name or format needs its own environment, registered as a task.
"""

from __future__ import annotations

from reopold.environments.tools import ToolEnvironment
from reopold.tasks.visual import ImagePromptTask, problem_images

MIN_SIDE = 28  # Qwen-VL's smallest image side (patch 14 x merge 2): smaller crops are scaled up to it


def _as_pil(image):
    from PIL import Image

    return image if hasattr(image, "crop") else Image.fromarray(image)


class CropEnvironment(ToolEnvironment):
    """One episode over a problem's images: ``crop_image`` may target any image seen so far (the prompt's, then
    earlier crops, counted from 1 in order of appearance)."""

    def __init__(self, call_format: str = "json", *, timeout: float = 10.0):
        super().__init__([self.crop_image], call_format=call_format, timeout=timeout, max_calls=1)
        self.images: list = []

    def reset(self, problem) -> list[dict]:
        self.images = [_as_pil(image).convert("RGB") for image in problem_images(problem)]
        content = [{"type": "image", "image": image} for image in self.images]
        return [{"role": "user", "content": [*content, {"type": "text", "text": problem.prompt}]}]

    def crop_image(self, bbox_2d: list, target_image: int = 1):
        """Zoom in on a region of an image seen so far.

        Args:
            bbox_2d: the region [x1, y1, x2, y2], in pixels of the target image, or normalised to [0, 1]
            target_image: which image, counting from 1 in the order the images appeared
        """
        if not 1 <= int(target_image) <= len(self.images):
            raise ValueError(f"target_image must be between 1 and {len(self.images)}, got {target_image}")
        image = self.images[int(target_image) - 1]
        if not (isinstance(bbox_2d, list | tuple) and len(bbox_2d) == 4):
            raise ValueError(f"bbox_2d must be four numbers [x1, y1, x2, y2], got {bbox_2d!r}")
        x1, y1, x2, y2 = (float(v) for v in bbox_2d)
        if max(x1, y1, x2, y2) <= 1:  # normalised coordinates
            x1, x2, y1, y2 = x1 * image.width, x2 * image.width, y1 * image.height, y2 * image.height
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(float(image.width), x2), min(float(image.height), y2)
        if not (x2 - x1 >= 1 and y2 - y1 >= 1):
            raise ValueError(f"bbox_2d {bbox_2d} is empty inside the {image.width}x{image.height} image")
        crop = image.crop((round(x1), round(y1), round(x2), round(y2)))
        scale = max(1.0, MIN_SIDE / min(crop.size))
        if scale > 1:
            crop = crop.resize((round(crop.width * scale), round(crop.height * scale)))
        self.images.append(crop)
        return crop


class ImageToolPromptTask(ImagePromptTask):
    """Image prompts from a file, answered in episodes with the ``crop_image`` tool."""

    name = "image-tool-prompts"

    def environment(self, call_format: str) -> CropEnvironment:
        return CropEnvironment(call_format)
