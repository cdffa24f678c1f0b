"""Argument checks shared by the core functions: fail early with a message that says what is allowed."""

from __future__ import annotations

import torch


def check_same_shape(**tensors: torch.Tensor) -> None:
    """All tensors must have the shape of the first one."""
    names = list(tensors)
    expected = tensors[names[0]].shape
    for name in names[1:]:
        if tensors[name].shape != expected:
            raise ValueError(
                f"{name} has shape {tuple(tensors[name].shape)} but {names[0]} has shape {tuple(expected)}; "
                "all per-token inputs must be (B, T) tensors over the same response tokens"
            )


def check_mask(name: str, mask: torch.Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(
            f"{name} must be a torch.bool tensor (True = valid token); got dtype {mask.dtype}. "
            f"Convert it with {name}.bool()"
        )


def check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {name}={value!r}")


def check_fraction(name: str, value: float, *, low_open: bool, high_open: bool) -> None:
    """Require value in an interval between 0 and 1 whose ends are open or closed as asked."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > 0 if low_open else value >= 0) and (value < 1 if high_open else value <= 1)
    if not ok:
        interval = ("(" if low_open else "[") + "0, 1" + (")" if high_open else "]")
        raise ValueError(f"{name} must be a number in {interval}; got {name}={value!r}")


def token_count(mask: torch.Tensor, num_tokens: torch.Tensor | int | float | None) -> torch.Tensor:
    """The loss denominator: the caller's global count, else this batch's; at least 1 so empty batches give 0."""
    if num_tokens is None:
        num_tokens = mask.sum()
    count = torch.as_tensor(num_tokens, dtype=torch.float32, device=mask.device)
    return count.clamp(min=1.0)
