"""REOPOLD as a TRL trainer: ``REOPOLDTrainer`` is TRL's ``DistillationTrainer`` with reopold's loss.

    from reopold.integrations.trl import REOPOLDConfig, REOPOLDTrainer
    trainer = REOPOLDTrainer(model=student, teacher_model=teacher, args=REOPOLDConfig(...), train_dataset=ds)
    trainer.train()

TRL keeps everything but the objective: on-policy generation (transformers or vLLM), teacher loading, the
vocabulary check, PEFT, image inputs and tool masks. Two hooks change (docs/integrations.md):

- ``_generate_and_score_completions`` (once per generation batch, i.e. per optimizer step): after TRL generates,
  one no-grad pass scores every completion token under the student (pi_old: log-prob and entropy) and the
  teacher (log-prob), the phase comes from ``state.global_step``, tau_beta from the entropies of every process,
  and ``distillation_shaping`` gives the keep mask whose global count replaces TRL's ``num_items_in_batch``.
- ``_compute_loss`` (per micro-batch): the student's log-probs of the sampled tokens, with gradient, then
  ``reopold_loss`` with that threshold and that kept-token count. No formula is written here.

TRL runs one optimizer step per generation batch, so pi_theta = pi_old inside every loss (the ratio is 1) and
R graded by pi_old equals R graded by the current policy.
"""

from __future__ import annotations

import math
import textwrap
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

import torch

from reopold import core

TESTED_TRL = (">=1.16", "<1.17")


def _check_trl_version(installed: str) -> None:
    """TRL's loss hooks are private and change between minor releases: refuse versions this was not tested on."""
    from packaging.version import Version

    low, high = (Version(bound.lstrip("<>=")) for bound in TESTED_TRL)
    if not low <= Version(installed) < Version(f"{high}"):
        raise ImportError(
            f"reopold.integrations.trl was tested with trl{','.join(TESTED_TRL)} and overrides its private hooks "
            f"(_generate_and_score_completions, _compute_loss); trl {installed} is installed. Install a tested "
            f"version with `pip install 'trl{','.join(TESTED_TRL)}'` (or `pip install 'reopold[trl]'`)."
        )


try:
    _check_trl_version(version("trl"))
except PackageNotFoundError as error:
    raise ImportError(
        f"reopold.integrations.trl needs TRL: `pip install 'reopold[trl]'` (trl{','.join(TESTED_TRL)})"
    ) from error

from trl import DistillationConfig, DistillationTrainer  # noqa: E402  (after the version check)

PAPER_CITATION = textwrap.dedent("""\
    @article{ko2026reopold,
        title   = {{Scaling Reasoning Efficiently via Relaxed On-Policy Distillation}},
        author  = {Ko and Abdali and Kim and Chen and Cameron},
        journal = {arXiv preprint arXiv:2603.11137},
        year    = 2026,
    }""")


@dataclass
class REOPOLDConfig(DistillationConfig):
    """``DistillationConfig`` plus REOPOLD's settings (Ko et al., arXiv 2603.11137; docs/algorithm.md).

    ``beta`` changes meaning: here it is REOPOLD's kept fraction of Eq. 8, not the JSD interpolation of
    ``DistillationConfig``, whose divergence this trainer does not compute.
    """

    lam: float = field(
        default=0.3,
        metadata={
            "help": "lambda of the mixture-based reward floor log(lam)/(1-lam) (Eq. 5/7), in (0, 1). "
            "The paper uses 0.3 (floor -1.72)."
        },
    )
    beta: float = field(
        default=0.2,
        metadata={
            "help": "beta of Eq. 8: fraction of valid tokens (highest student entropy, threshold tau_beta) "
            "trained on in the refinement phase, in (0, 1]. 0.2 in the paper (0.4 for agentic "
            "tasks). Not DistillationConfig's JSD beta: REOPOLDTrainer does not compute a JSD."
        },
    )
    switch_step: int | None = field(
        default=None,
        metadata={
            "help": "T_switch of Eq. 9/10: optimizer steps of the exploration phase before refinement "
            "starts (0 = refinement from the first step). None: switch_fraction of max_steps."
        },
    )
    switch_fraction: float = field(
        default=1 / 3,
        metadata={
            "help": "T_switch as a fraction of the total optimizer steps, used when switch_step is None "
            "(the paper: 100 of 300 steps)."
        },
    )
    stop_gradient: bool = field(
        default=True,
        metadata={
            "help": "sg(R) of Remark 3.1: the token reward is a constant for the policy gradient. False is "
            "vanilla sampled-token reverse KL (RKL), the paper's ablation baseline."
        },
    )
    reward_floor: bool = field(
        default=True,
        metadata={"help": "Clip the reward from below at log(lam)/(1-lam): R_hat = max(R, floor) (Eq. 7)."},
    )
    entropy_selection: bool = field(
        default=True,
        metadata={
            "help": "In refinement keep only tokens with entropy H >= tau_beta (Eq. 8, 10); False keeps "
            "every valid token."
        },
    )
    reward_policy: str = field(
        default="old",
        metadata={
            "help": "Which student log-probs grade R = log pi_T - log pi: 'old' (the rollout-time "
            "student) or 'current' (the policy being trained, detached). Equal here: TRL makes one "
            "optimizer step per generation batch."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Disable dropout in the student, so the scoring pass (pi_old) and the loss pass see the "
            "same policy."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        core.reward_floor(self.lam)  # raises with the allowed range
        if not 0.0 < self.beta <= 1.0:
            raise ValueError(f"beta must be in (0, 1] (REOPOLD's kept fraction of Eq. 8); got beta={self.beta}")
        if self.switch_step is not None and self.switch_step < 0:
            raise ValueError(f"switch_step must be >= 0 or None; got switch_step={self.switch_step}")
        if not 0.0 <= self.switch_fraction <= 1.0:
            raise ValueError(f"switch_fraction must be in [0, 1]; got switch_fraction={self.switch_fraction}")
        if self.reward_policy not in core.REWARD_POLICIES:
            raise ValueError(f"reward_policy must be one of {core.REWARD_POLICIES}; got {self.reward_policy!r}")


def _plain_head(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output projection of ``model``; refuses models whose logits are rescaled or soft-capped after it."""
    config = model.config.get_text_config()
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            raise NotImplementedError(
                f"{type(model).__name__} rescales its logits ({name}={getattr(config, name)}); "
                "reopold.integrations.trl supports plain lm_head models only"
            )
    if getattr(config, "final_logit_softcapping", None) is not None:
        raise NotImplementedError(
            f"{type(model).__name__} soft-caps its logits; reopold.integrations.trl supports plain lm_head models only"
        )
    head = model.get_output_embeddings()
    weight, bias = head.weight, head.bias
    if isinstance(weight, torch.distributed.tensor.DTensor):  # FSDP2: one all-gather, not one per chunk
        weight = weight.full_tensor()
        bias = bias.full_tensor() if bias is not None else None
    return weight, bias


class REOPOLDTrainer(DistillationTrainer):
    """TRL's on-policy ``DistillationTrainer`` training the REOPOLD objective (Eq. 10) instead of a JSD."""

    _tag_names = ["trl", "distillation", "reopold"]
    _name = "REOPOLD"
    _paper = {
        "title": "Scaling Reasoning Efficiently via Relaxed On-Policy Distillation",
        "id": "2603.11137",
        "citation": PAPER_CITATION,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, REOPOLDConfig):
            raise TypeError(f"REOPOLDTrainer needs args=REOPOLDConfig(...); got {type(self.args).__name__}")
        if self.teacher_model is None:
            raise ValueError("REOPOLDTrainer needs a local teacher_model (the teacher scores every sampled token)")
        self._last_loss_metrics: dict[str, torch.Tensor] = {}

    # ---- scoring: once per generation batch ---------------------------------------------------------------------

    def switch_step(self) -> int:
        """T_switch in optimizer steps (Eq. 9/10)."""
        if self.args.switch_step is not None:
            return self.args.switch_step
        return round(self.args.switch_fraction * self.state.max_steps)

    def _sampled_token_stats(self, model, inputs: dict, with_entropy: bool):
        """(B, C) log-prob of each completion token under ``model`` and, optionally, the entropy there."""
        input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        multimodal = {k: inputs[k] for k in _MULTIMODAL_KEYS if k in inputs}
        hidden = self._get_last_hidden_state(
            model, input_ids, attention_mask, inputs["completion_ids"].size(1), **multimodal
        )  # (B, C, D)
        weight, bias = _plain_head(model)
        return core.logprobs_from_hidden(
            hidden.to(weight.device),
            weight,
            inputs["completion_ids"].to(weight.device),
            temperature=self.temperature,
            with_entropy=with_entropy,
            lm_head_bias=bias,
        )

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        args = self.args
        mask = self._loss_mask(output)  # (B, C) bool
        unwrapped_student = self.accelerator.unwrap_model(self.model)
        unwrapped_teacher = self.accelerator.unwrap_model(self.teacher_model)
        self.teacher_model.eval()
        with torch.no_grad():
            old_logprobs, entropy = self._forward_redirection(
                self.model_wrapped, unwrapped_student, self._sampled_token_stats, unwrapped_student, output, True
            )
            teacher_logprobs, _ = self._forward_redirection(
                self.teacher_model, unwrapped_teacher, self._sampled_token_stats, unwrapped_teacher, output, False
            )
        phase = core.phase_at(self.state.global_step, self.switch_step())
        threshold = None
        if phase == "refinement" and args.entropy_selection:  # tau_beta over the generation batch of every process
            all_entropy = self.accelerator.gather(self.accelerator.pad_across_processes(entropy, dim=1))
            all_mask = self.accelerator.gather(self.accelerator.pad_across_processes(mask, dim=1))
            threshold = core.entropy_threshold(all_entropy, all_mask, beta=args.beta)
        shaped = core.distillation_shaping(
            old_logprobs, teacher_logprobs, entropy, mask.to(old_logprobs.device), phase=phase, lam=args.lam,
            beta=args.beta, threshold=threshold, stop_gradient=args.stop_gradient, reward_floor=args.reward_floor,
            entropy_selection=args.entropy_selection,
        )  # fmt: skip
        device = output["completion_ids"].device
        output.update(
            old_logprobs=old_logprobs.to(device),
            teacher_logprobs=teacher_logprobs.to(device),
            entropy=entropy.to(device),
            reopold_refinement=torch.tensor(phase == "refinement", device=device),
            reopold_threshold=torch.tensor(math.nan if threshold is None else float(threshold), device=device),
            # The loss normaliser of Eq. 10: kept tokens of the whole generation batch on every process.
            num_items_in_batch=self.accelerator.gather(shaped.keep_mask.sum().to(device)).sum().float(),
        )
        return output

    @staticmethod
    def _loss_mask(inputs: dict) -> torch.Tensor:
        mask = inputs["completion_mask"].bool()
        return mask & inputs["tool_mask"].bool() if "tool_mask" in inputs else mask  # tool outputs are not trained

    # ---- loss: per micro-batch ---------------------------------------------------------------------------------

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        args = self.args
        student_logprobs, _ = self._sampled_token_stats(unwrapped_student, inputs, with_entropy=False)
        device = student_logprobs.device
        mask = self._loss_mask(inputs).to(device)
        refinement = bool(inputs["reopold_refinement"])
        threshold = inputs["reopold_threshold"]
        entropy = inputs["entropy"].to(device)
        loss, metrics = core.reopold_loss(
            student_logprobs, inputs["old_logprobs"].to(device), inputs["teacher_logprobs"].to(device), entropy, mask,
            phase="refinement" if refinement else "exploration", lam=args.lam, beta=args.beta,
            threshold=None if torch.isnan(threshold) else threshold.to(device), num_tokens=num_items_in_batch,
            stop_gradient=args.stop_gradient, reward_floor=args.reward_floor,
            entropy_selection=args.entropy_selection, reward_policy=args.reward_policy,
        )  # fmt: skip
        metrics["refinement"] = torch.tensor(float(refinement))
        self._last_loss_metrics = metrics
        entropy_sum = torch.where(mask, entropy, torch.zeros_like(entropy)).sum()
        return loss, entropy_sum.detach(), mask.sum()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        mode = "train" if self.model.training else "eval"
        names = sorted(self._last_loss_metrics)
        values = torch.stack([self._last_loss_metrics[k].float().reshape(()).cpu() for k in names])
        values = self.accelerator.gather_for_metrics(values.to(self.accelerator.device)).view(-1, len(names))
        for name, value in zip(names, values.nanmean(dim=0).tolist(), strict=True):
            self._metrics[mode][f"reopold/{name}"].append(value)
        return result


_MULTIMODAL_KEYS = (
    "pixel_values", "image_grid_thw", "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids",
    "mm_token_type_ids", "image_position_ids",
)  # fmt: skip
