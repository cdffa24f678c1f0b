"""The configuration of ``reopold train``: one dataclass tree, every field with a default and a help string.

Field defaults are the paper's math-1.5B recipe (Table 7). ``reopold train`` without ``--config``
starts from the bundled demo config instead (``configs/demo.yaml``), which sizes the run for a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from reopold.config.loader import ConfigError, option
from reopold.registry import ALGORITHMS, TASKS

# What each on-policy distillation algorithm switches on (docs/algorithm.md); None in the config means "as the
# algorithm says", so `algo.name=reopold algo.two_phase=false` is the ablation without the two phases.
ALGORITHM_SWITCHES = {
    "reopold": {"stop_gradient": True, "reward_floor": True, "entropy_selection": True, "two_phase": True},
    "rkl": {"stop_gradient": False, "reward_floor": False, "entropy_selection": False, "two_phase": False},
    "rkl_sg": {"stop_gradient": True, "reward_floor": False, "entropy_selection": False, "two_phase": False},
}


@dataclass
class StudentConfig:
    model: str = option("demo-student", "student pi_theta: a Hugging Face causal LM name or local path "
                        "('demo-student' is the bundled one)")
    dtype: str = option("float32", "weights dtype of the student", choices=("float32", "bfloat16"))
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    freeze_vision: bool = option(True, "vision-language students: no training (and no LoRA adapters) for the vision "
                                 "tower and projector")


@dataclass
class LoraConfig:
    r: int = option(0, "LoRA rank of the student's adapters (PEFT); 0 trains every weight")
    alpha: float = option(16.0, "LoRA alpha: adapter updates are scaled by alpha / r")
    dropout: float = option(0.0, "dropout on the adapters' input during updates")
    target_modules: list[str] = option(["all-linear"], "modules that get adapters: names such as q_proj, v_proj, "
                                       "or all-linear")


@dataclass
class TeacherConfig:
    model: str = option("demo-teacher", "teacher pi_T: a Hugging Face causal LM name or local path with the "
                        "student's vocabulary ('demo-teacher' is the bundled one)")
    dtype: str = option("float32", "weights dtype of the teacher", choices=("float32", "bfloat16", "float16"))
    temperature: float = option(1.0, "temperature at which the teacher scores tokens (1.0: the sampling one)")
    micro_batch_size: int = option(64, "responses per teacher forward pass (per request with teacher.url)")
    url: str | None = option(None, "score with a teacher server instead (vLLM or `reopold serve-teacher`), e.g. "
                             "http://127.0.0.1:8000; teacher.model is then the served model name")
    timeout: float = option(120.0, "seconds to wait for one teacher-server request")
    retries: int = option(5, "retries of a failed teacher-server request (exponential backoff) before stopping")
    backoff: float = option(1.0, "seconds before the first retry; doubles on each further one")
    api_key_env: str | None = option(None, "environment variable holding the teacher server's API key (the key "
                                     "itself never goes into the saved config)")
    tokenizer: str | None = option(None, "the teacher's tokenizer (name or path); None = teacher.model's. With "
                                   "teacher.url: a local copy of the served teacher's tokenizer, needed when it "
                                   "differs from the student's (span alignment, docs/cross_tokenizer.md)")
    span_logprob: str = option("marginal", "a teacher of another tokenizer: how a span's teacher log-prob is read. "
                               "marginal: the probability of the span's text, summed over the teacher tokens that "
                               "cross its end (exact for a teacher in this process or reopold serve-teacher; from a "
                               "vLLM server's top-20 prompt_logprobs, a lower bound); canonical: the teacher's own "
                               "cut, whose last token also bets on where the next token starts",
                               choices=("marginal", "canonical"))


@dataclass
class NamedTeacherConfig(TeacherConfig):
    name: str = option("", "the teacher's name: the routing key value of the prompts it scores, and the suffix of "
                       "its metrics (reward_mean/<name>, ...)")


@dataclass
class DataConfig:
    task: str = option("arithmetic", "a bundled verifiable task ('arithmetic'), 'prompts' to read data.prompts, or "
                       "any registered with reopold.registry.TASKS", choices=TASKS.names)
    digits: list[int] = option([3, 2], "digits of the two factors of the arithmetic task")
    prompts: str | None = option(None, "JSONL file or dataset saved with save_to_disk, for data.task=prompts")
    prompt_key: str = option("prompt", "field holding the prompt text")
    image_key: str = option("images", "data.task=image-prompts: field holding a row's image or list of images (file "
                            "paths relative to the JSONL file, or a datasets Image column)")
    answer_key: str = option("answer", "field holding the reference answer (needed by grpo and evaluation)")
    checker: str = option("exact", "how data.task=prompts grades answers: exact (normalised last \\boxed{} or number) "
                          "or math (symbolic equivalence with math-verify: pip install 'reopold[math]')",
                          choices=("exact", "math"))
    chat_template: str = option("auto", "wrap prompts in the tokenizer's chat template: auto = when it has one",
                                choices=("auto", "on", "off"))
    train_problems: int = option(20000, "size of the training prompt pool (at most the split's size)")
    eval_problems: int = option(1000, "held-out problems per evaluation")
    preflight_problems: int = option(16, "training prompts the teacher answers greedily before training to "
                                     "check that the task's checker accepts its answers; 0 skips the check")
    eval_split: str = option("test", "held-out split used for evaluation", choices=("validation", "test"))
    teacher_key: str | None = option(None, "with several teachers and data.task=prompts: the column naming each "
                                     "prompt's teacher; None routes every prompt to the teacher named data.task")
    max_prompt_tokens: int | None = option(None, "image prompts: drop (counted) training and held-out prompts longer "
                                           "than this, image tokens included; prompts are never cut")


@dataclass
class AlgoConfig:
    name: str = option("reopold", "objective: reopold, rkl, rkl_sg, grpo, sft, gkd, or any registered with "
                       "reopold.registry.ALGORITHMS (docs/algorithm.md)", choices=ALGORITHMS.names)
    lam: float = option(0.3, "lam: mixture weight of the reward floor log(lam)/(1-lam) (Eq. 7)")
    beta: float = option(0.2, "beta: fraction of highest-entropy tokens kept in refinement (Eq. 8)")
    switch_step: int | None = option(None, "T_switch: first refinement step (Eq. 10); None = a third of run.steps")
    clip_eps: float = option(0.2, "eps of the PPO ratio clip (lower side)")
    clip_eps_high: float | None = option(None, "upper PPO ratio clip; None = clip_eps")
    reward_policy: str = option("old", "which student log-probs grade R = log pi_T - log pi (Eq. 3): old (pi_old, "
                                "fixed for every update of a rollout step) or current (the current policy, "
                                "detached, per update); equal with one update per rollout (docs/algorithm.md)",
                                choices=("old", "current"))  # reopold.core.REWARD_POLICIES (no torch here)
    span_credit: str = option("span", "a teacher of another tokenizer: span (each span's reward R_span graded once, "
                              "its gradient shared by the span's tokens) or token (R_span split over the span's "
                              "student tokens in proportion to their surprisal under pi_old, then every token graded "
                              "on its own); docs/cross_tokenizer.md", choices=("span", "token"))
    stop_gradient: bool | None = option(None, "ablation: treat the reward as a constant, sg(R); None = algorithm's")
    reward_floor: bool | None = option(None, "ablation: clip rewards at the floor; None = algorithm's")
    entropy_selection: bool | None = option(None, "ablation: train only top-beta entropy tokens; None = algorithm's")
    two_phase: bool | None = option(None, "ablation: exploration before T_switch; None = algorithm's")
    gkd_beta: float = option(0.5, "beta of the generalized JSD for gkd (0 forward KL, 1 reverse KL)")
    gkd_top_k: int | None = option(None, "gkd: restrict to the teacher's top-k tokens; None = full vocabulary")

    def __post_init__(self):
        if not 0 < self.lam < 1:
            raise ConfigError(f"algo.lam must be in (0, 1) (the paper uses 0.3); got {self.lam}")
        if not 0 < self.beta <= 1:
            raise ConfigError(f"algo.beta must be in (0, 1] (the paper uses 0.2); got {self.beta}")
        if self.clip_eps <= 0 or (self.clip_eps_high is not None and self.clip_eps_high <= 0):
            raise ConfigError("algo.clip_eps and algo.clip_eps_high must be > 0")
        if not 0 <= self.gkd_beta <= 1:
            raise ConfigError(f"algo.gkd_beta must be in [0, 1]; got {self.gkd_beta}")
        if self.gkd_top_k is not None and self.gkd_top_k < 1:
            raise ConfigError(f"algo.gkd_top_k must be >= 1 or None; got {self.gkd_top_k}")

    def check_switches(self) -> None:
        """Ablation switches only mean something for reopold/rkl/rkl_sg (checked by TrainConfig after the checks
        that name a more basic problem, e.g. gkd with a served teacher)."""
        switches = [k for k in ALGORITHM_SWITCHES["reopold"] if getattr(self, k) is not None]
        if switches and self.name not in ALGORITHM_SWITCHES:
            raise ConfigError(f"algo.{switches[0]} is an ablation switch of reopold/rkl/rkl_sg; "
                              f"it has no meaning for algo.name={self.name}. Remove it (on the command line: "
                              f"--algo.{switches[0]} null)")

    def switches(self) -> dict[str, bool]:
        """The four ablation switches in effect: the algorithm's, overridden by any set explicitly."""
        base = ALGORITHM_SWITCHES.get(self.name, ALGORITHM_SWITCHES["reopold"])
        return {k: base[k] if getattr(self, k) is None else getattr(self, k) for k in base}


@dataclass
class RolloutConfig:
    prompts_per_step: int = option(128, "prompts sampled per rollout step")
    samples_per_prompt: int = option(8, "responses the student samples per prompt (n)")
    max_new_tokens: int = option(8192, "maximum response length in tokens")
    temperature: float = option(1.0, "sampling temperature; student log-probs are taken at the same one")
    engine: str = option("hf", "student sampler: hf (transformers generate) or vllm (pip install "
                         "'reopold[vllm]' on GPU, scripts/install_vllm.sh on CPU; weights are synced into it after "
                         "every step)", choices=("hf", "vllm"))
    vllm_url: str | None = option(None, "with rollout.engine=vllm: a TRL `trl vllm-serve` server to sample from "
                                  "instead of a vLLM engine colocated in this process")
    vllm_gpu_memory: float = option(0.3, "with a colocated vLLM engine: fraction of GPU memory it may take")
    vllm_cpu_kv_cache_mb: int = option(512, "with a colocated vLLM engine on CPU: its KV cache in MiB (vLLM's CPU "
                                       "build otherwise reserves most of the machine's memory)")
    engine_logprobs: bool = option(True, "with a colocated vLLM engine and a float32 student without autocast: take "
                                   "pi_old from vLLM's sampled-token log-probs and skip the trainer's scoring pass "
                                   "where no entropies are needed (see docs/vllm.md)")
    max_turns: int = option(1, "assistant turns per episode, for a task with an environment (tool use, docs/tools.md); "
                            "the paper's agentic recipe allows 2 tool rounds, so 3 turns; rollout.max_new_tokens "
                            "then bounds each turn")
    max_episode_tokens: int = option(0, "with a task with an environment: end an episode once its response (turns and "
                                     "observations) holds this many tokens; 0 = no cap")
    step_timeout: float = option(60.0, "with a task with an environment: seconds one environment step (its tool calls) "
                                 "may take before the episode is stopped and counted in env_error_frac")


@dataclass
class OptimConfig:
    lr: float = option(1e-5, "AdamW learning rate (constant after warmup)")
    warmup_steps: int = option(0, "optimizer updates of linear warmup from 0")
    weight_decay: float = option(0.0, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    grad_clip: float = option(1.0, "maximum global gradient norm; 0 disables clipping")
    mini_batch_prompts: int = option(32, "prompts per policy update; prompts_per_step / this = updates per rollout")
    epochs: int = option(1, "passes over each rollout batch (PPO epochs)")
    micro_batch_size: int = option(32, "responses per forward/backward (gradient accumulation inside an update)")


@dataclass
class RunConfig:
    steps: int = option(300, "rollout steps k of the run")
    seed: int = option(0, "seed of sampling, data order and initialisation")
    output_dir: str = option("runs", "directory holding one folder per run")
    name: str | None = option(None, "run folder name; None = '<algo>-seed<seed>'")
    overwrite: bool = option(False, "delete an existing run folder of the same name instead of refusing to start")
    eval_every: int = option(25, "evaluate every this many steps (and at the start and the end); 0 = never")
    save_every: int = option(50, "checkpoint every this many steps (and at the end)")
    keep_checkpoints: int = option(2, "checkpoints kept on disk (oldest removed first)")
    max_bad_steps: int = option(3, "stop (with a checkpoint) after this many consecutive NaN/inf losses")
    mixed_precision: str = option("no", "autocast: 'bf16' speeds up models above ~1M parameters on AMX CPUs and GPUs",
                                  choices=("no", "bf16"))
    threads: int | None = option(None, "torch CPU threads; None or 0 = auto: 1 on a machine with 2 cores or fewer "
                                 "(spare threads spin when other work shares the cores), else torch's default; "
                                 "OMP_NUM_THREADS, when set, is kept")
    tensorboard: bool = option(False, "also log to TensorBoard (pip install 'reopold[tracking]')")
    wandb_project: str | None = option(None, "also log to this W&B project (pip install 'reopold[tracking]')")
    progress: bool = option(True, "show a progress bar")
    report: bool = option(True, "write report.md with plots at the end")


@dataclass
class TrainConfig:
    student: StudentConfig = option(StudentConfig, "the model being trained")
    lora: LoraConfig = option(LoraConfig, "train low-rank adapters instead of the whole student")
    teacher: TeacherConfig = option(TeacherConfig, "the frozen model that grades the student's tokens")
    data: DataConfig = option(DataConfig, "prompts and the task that checks answers")
    algo: AlgoConfig = option(AlgoConfig, "the objective and its paper symbols")
    rollout: RolloutConfig = option(RolloutConfig, "on-policy sampling")
    optim: OptimConfig = option(OptimConfig, "the policy update")
    run: RunConfig = option(RunConfig, "length, seeds, outputs")
    teachers: list[NamedTeacherConfig] = option([], "several teachers instead of teacher, e.g. [{name: math, model: "
                                                "M}, {name: code, url: U, model: C}]: each prompt is scored by the "
                                                "one data.teacher_key names (docs/teachers.md)")

    def __post_init__(self):
        positive = {
            "rollout.prompts_per_step": self.rollout.prompts_per_step,
            "rollout.samples_per_prompt": self.rollout.samples_per_prompt,
            "rollout.max_new_tokens": self.rollout.max_new_tokens,
            "rollout.vllm_cpu_kv_cache_mb": self.rollout.vllm_cpu_kv_cache_mb,
            "rollout.max_turns": self.rollout.max_turns,
            "rollout.step_timeout": self.rollout.step_timeout,
            "optim.mini_batch_prompts": self.optim.mini_batch_prompts,
            "optim.micro_batch_size": self.optim.micro_batch_size,
            "optim.epochs": self.optim.epochs,
            "run.steps": self.run.steps,
            "run.save_every": self.run.save_every,
            "run.keep_checkpoints": self.run.keep_checkpoints,
            "run.max_bad_steps": self.run.max_bad_steps,
            "data.eval_problems": self.data.eval_problems,
            "data.train_problems": self.data.train_problems,
            "teacher.micro_batch_size": self.teacher.micro_batch_size,
        }
        if self.lora.r < 0 or not 0 <= self.lora.dropout < 1:
            raise ConfigError(f"lora.r must be >= 0 and lora.dropout in [0, 1); got {self.lora.r}, {self.lora.dropout}")
        for key, value in positive.items():
            if value <= 0:
                raise ConfigError(f"{key} must be > 0; got {value}")
        for key, value in {"rollout.temperature": self.rollout.temperature, "optim.lr": self.optim.lr,
                           "teacher.temperature": self.teacher.temperature}.items():
            if not value > 0:
                raise ConfigError(f"{key} must be > 0; got {value}")
        if self.rollout.prompts_per_step % self.optim.mini_batch_prompts:
            raise ConfigError(f"rollout.prompts_per_step ({self.rollout.prompts_per_step}) must be a multiple of "
                              f"optim.mini_batch_prompts ({self.optim.mini_batch_prompts})")
        if self.algo.name == "grpo" and self.rollout.samples_per_prompt < 2:
            raise ConfigError("grpo normalises rewards within each prompt's group: set rollout.samples_per_prompt >= 2")
        self._check_teachers()
        if self.data.task == "prompts" and not self.data.prompts:
            raise ConfigError("data.task=prompts needs data.prompts: a JSONL file or a dataset saved on disk")
        if self.data.task in ("image-prompts", "image-tool-prompts") and not self.data.prompts:
            raise ConfigError(f"data.task={self.data.task} needs data.prompts: a JSONL file or a dataset saved on disk")
        if self.data.max_prompt_tokens is not None and self.data.max_prompt_tokens <= 0:
            raise ConfigError(f"data.max_prompt_tokens must be > 0 or None; got {self.data.max_prompt_tokens}")
        if self.algo.switch_step is not None and self.algo.switch_step < 0:
            raise ConfigError(f"algo.switch_step must be >= 0 or None; got {self.algo.switch_step}")
        if self.rollout.max_episode_tokens < 0:
            raise ConfigError(f"rollout.max_episode_tokens must be >= 0 (0: no cap); got "
                              f"{self.rollout.max_episode_tokens}")
        if self.run.eval_every < 0:
            raise ConfigError(f"run.eval_every must be >= 0; got {self.run.eval_every}")
        self._check_numbers()
        self._check_run_name()
        self.algo.check_switches()

    def _check_teachers(self) -> None:
        """teacher / teachers: local or served, names, routing, and what each algorithm needs of them."""
        for key, teacher in self.teacher_specs().items():
            if teacher.micro_batch_size <= 0 or not teacher.temperature > 0:
                raise ConfigError(f"{key}.micro_batch_size and {key}.temperature must be > 0")
            if teacher.url is None:
                continue
            if not teacher.url.startswith(("http://", "https://")):
                raise ConfigError(f"{key}.url must start with http:// or https://; got {teacher.url!r}")
            if self.algo.name in ("gkd", "sft"):
                raise ConfigError(f"algo.name={self.algo.name} needs a local teacher (full distributions or "
                                  f"teacher samples); unset {key}.url")
            if teacher.temperature != 1.0:
                raise ConfigError(f"a teacher server scores at temperature 1.0; unset {key}.temperature")
        if self.teachers:
            names = [t.name for t in self.teachers]
            if not all(names) or len(set(names)) != len(names):
                raise ConfigError(f"every entry of teachers needs a name, each a different one; got {names}")
            if self.teacher != TeacherConfig():
                raise ConfigError("set either teacher (one teacher) or teachers (several), not both")
            if self.algo.name in ("gkd", "sft"):
                raise ConfigError(f"algo.name={self.algo.name} learns from one teacher's distributions or samples; "
                                  "several teachers grade sampled tokens (reopold, rkl, rkl_sg)")
        if self.data.teacher_key is not None and (not self.teachers or self.data.task != "prompts"):
            raise ConfigError("data.teacher_key names a column of data.prompts that routes prompts among several "
                              "teachers: it needs data.task=prompts and a teachers list")

    def _check_numbers(self) -> None:
        """Ranges of the numeric keys not checked above, so none reaches torch (a negative warmup would make the
        learning rate negative: gradient ascent) or fails only after the models have loaded."""
        for section in (self.student, self.lora, self.teacher, self.data, self.algo, self.rollout, self.optim,
                        self.run):
            for name, value in vars(section).items():
                if isinstance(value, float) and not math.isfinite(value):
                    raise ConfigError(f"{_section_name(section)}.{name} must be a finite number; got {value}")
        at_least_zero = {
            "optim.warmup_steps": self.optim.warmup_steps, "optim.weight_decay": self.optim.weight_decay,
            "optim.grad_clip": self.optim.grad_clip, "teacher.retries": self.teacher.retries,
            "teacher.backoff": self.teacher.backoff, "data.preflight_problems": self.data.preflight_problems,
            "run.threads": self.run.threads or 0, "run.seed": self.run.seed,
        }  # fmt: skip
        for key, value in at_least_zero.items():
            if value < 0:
                raise ConfigError(f"{key} must be >= 0; got {value}")
        betas = {"optim.adam_beta1": self.optim.adam_beta1, "optim.adam_beta2": self.optim.adam_beta2}
        for key, value in betas.items():
            if not 0 <= value < 1:
                raise ConfigError(f"{key} must be in [0, 1); got {value}")
        if not self.teacher.timeout > 0:
            raise ConfigError(f"teacher.timeout must be > 0 seconds; got {self.teacher.timeout}")
        if not 0 < self.rollout.vllm_gpu_memory <= 1:
            raise ConfigError(f"rollout.vllm_gpu_memory must be in (0, 1]; got {self.rollout.vllm_gpu_memory}")
        if self.lora.r > 0 and not self.lora.alpha > 0:
            raise ConfigError(f"lora.alpha must be > 0; got {self.lora.alpha}")
        if not all(d > 0 for d in self.data.digits):
            raise ConfigError(f"data.digits must be positive; got {self.data.digits}")

    def _check_run_name(self) -> None:
        """run.name is one folder inside run.output_dir: no separators, no '..'."""
        name = self.run.name
        if name is not None and (name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name):
            raise ConfigError(f"run.name must be a plain folder name (no '/', '\\' or '..'); got {name!r}. "
                              "run.output_dir chooses where run folders go")

    def teacher_specs(self) -> dict[str, TeacherConfig]:
        """Every teacher by its config key: {"teacher": ...}, or {"teachers[i]": ...} with several."""
        if not self.teachers:
            return {"teacher": self.teacher}
        return {f"teachers[{i}]": teacher for i, teacher in enumerate(self.teachers)}

    @property
    def switch_step(self) -> int:
        """T_switch: the configured one, else a third of the steps (paper: 100/300, 50/200, 20/60, 10/40)."""
        return self.run.steps // 3 if self.algo.switch_step is None else self.algo.switch_step

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.algo.name}-seed{self.run.seed}"


def _section_name(section) -> str:
    return type(section).__name__.removesuffix("Config").lower()
