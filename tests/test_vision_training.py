"""Image prompts through every pass: the Rollout's image inputs, sampling, teacher-forced scoring, guards and
training, on tiny Qwen2.5-VL models built here (nothing downloaded)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from reopold.models.scorer import TokenScorer  # noqa: E402
from reopold.models.vision import build_processor, build_tiny_vlm, build_vlm_tokenizer, never_sampled_ids  # noqa: E402
from reopold.rollout import HFRolloutEngine, Rollout  # noqa: E402
from reopold.tasks.visual import PromptTooLong, VisionPromptEncoder, VisualAdditionTask  # noqa: E402

NEW_TOKENS = 10


def _sharpen(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


@pytest.fixture(scope="module")
def vlm():
    torch.set_num_threads(1)
    processor = build_processor(build_vlm_tokenizer())
    model = _sharpen(build_tiny_vlm(processor.tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, seed=0), 1).eval()
    return model, processor


@pytest.fixture(scope="module")
def problems():
    return VisualAdditionTask().problems("test", 4)


def _engine(model, processor, **kw):
    return HFRolloutEngine(model, processor.tokenizer, max_new_tokens=NEW_TOKENS, vision=VisionPromptEncoder(processor),
                           suppress_tokens=never_sampled_ids(processor.tokenizer), **kw)


def _row_pixels(rollout: Rollout, row: int) -> torch.Tensor:
    """The pixel rows of ``row``'s images, read through the row's own image count."""
    images = rollout.images
    counts = images.images_per_row.tolist()
    first = sum(counts[:row])
    blocks = torch.split(images.pixel_values, images.image_grid_thw.prod(-1).tolist())
    return torch.cat(blocks[first : first + counts[row]])


def test_images_stay_with_their_rows(vlm, problems):
    model, processor = vlm
    torch.manual_seed(0)
    rollout = _engine(model, processor).generate([], problems, num_samples=3)
    assert len(rollout) == 12 and rollout.images.images_per_row.tolist() == [1] * 12
    _, _, alone = VisionPromptEncoder(processor).batch(problems)
    own = torch.split(alone.pixel_values, alone.image_grid_thw.prod(-1).tolist())
    for row in range(12):  # n samples: the rows of a prompt carry its image
        assert torch.equal(_row_pixels(rollout, row), own[row // 3])
    picked = rollout.select([11, 0, 5, 5])  # reordered, repeated
    for i, row in enumerate([11, 0, 5, 5]):
        assert torch.equal(_row_pixels(picked, i), own[row // 3])
        assert torch.equal(picked.images.mm_token_type_ids[i], rollout.images.mm_token_type_ids[row])
    micro = picked.select([2, 1])  # a micro-batch of a selection
    assert torch.equal(_row_pixels(micro, 0), own[5 // 3]) and torch.equal(_row_pixels(micro, 1), own[0])
    # Rows with different image counts (0 and 2 images): blocks move with their rows, not with batch positions.
    from reopold.rollout import ImageInputs

    grid = torch.tensor([[1, 2, 2], [1, 4, 4], [1, 2, 4]])
    pixels = torch.cat([torch.full((int(g.prod()), 2), float(i)) for i, g in enumerate(grid)])
    images = ImageInputs(pixels, grid, torch.tensor([2, 0, 1]), torch.zeros((3, 5), dtype=torch.long))
    sub = images.select(torch.tensor([2, 1, 0]))
    assert sub.image_grid_thw.tolist() == [[1, 2, 4], [1, 2, 2], [1, 4, 4]]
    assert sub.pixel_values[:, 0].tolist() == [2.0] * 8 + [0.0] * 4 + [1.0] * 16


def test_sampling_never_emits_vision_tokens(vlm, problems):
    model, processor = vlm
    torch.manual_seed(0)
    rollout = _engine(model, processor).generate([], problems * 4, num_samples=4)
    banned = torch.tensor(never_sampled_ids(processor.tokenizer))
    assert not torch.isin(rollout.completion_ids[rollout.completion_mask], banned).any()


def test_forced_pass_matches_generate_raw_logits(vlm, problems):
    model, processor = vlm
    encoder = VisionPromptEncoder(processor)
    ids, mask, images = encoder.batch(problems)
    torch.manual_seed(0)
    out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=images.pixel_values,
                         image_grid_thw=images.image_grid_thw, mm_token_type_ids=images.mm_token_type_ids,
                         do_sample=True, top_k=0, top_p=1.0, temperature=1.0, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, suppress_tokens=never_sampled_ids(processor.tokenizer),
                         output_logits=True, return_dict_in_generate=True,
                         pad_token_id=processor.tokenizer.pad_token_id)
    completion = out.sequences[:, ids.shape[1] :]
    raw = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, completion[..., None])[..., 0]  # (B, T)
    done = torch.ones_like(completion, dtype=torch.bool)
    rollout = Rollout(torch.cat([ids, completion], 1), torch.cat([mask, done.long()], 1), done, ids.shape[1],
                      list(problems), images=images)
    scorer = TokenScorer(model, chunk_size=3)
    logprobs, entropy = scorer(rollout)
    assert (logprobs - raw).abs().max() < 1e-5
    unchunked, _ = TokenScorer(model, chunk_size=10_000)(rollout)
    assert (unchunked - logprobs).abs().max() < 1e-6
    full_logits = scorer(rollout, return_logits=True)
    assert (full_logits.log_softmax(-1).gather(-1, completion[..., None])[..., 0] - raw).abs().max() < 1e-5
    # Without mm_token_type_ids the model silently falls back to 1-D positions: the log-probs move.
    inputs = {"input_ids": rollout.input_ids, "attention_mask": rollout.attention_mask, "use_cache": False,
              "pixel_values": images.pixel_values, "image_grid_thw": images.image_grid_thw}
    blind_positions = model(**inputs).logits[:, ids.shape[1] - 1 : -1].log_softmax(-1)
    moved = (blind_positions.gather(-1, completion[..., None])[..., 0] - raw).abs()
    assert moved.max() > 1e-3


def test_truncation_guard_refuses_and_counts(vlm, problems):
    _, processor = vlm
    lengths = VisionPromptEncoder(processor).lengths(problems)
    encoder = VisionPromptEncoder(processor, max_prompt_tokens=min(lengths) - 1)
    with pytest.raises(PromptTooLong, match="never cut"):
        encoder.batch(problems)
    kept, dropped = encoder.keep_fitting(problems)
    assert kept == [] and dropped == len(problems)
    assert VisionPromptEncoder(processor, max_prompt_tokens=max(lengths)).keep_fitting(problems) == (problems, 0)


# ---- training runs: tiny VLMs saved here, through reopold.train.run.train ------------------------------------
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402

from reopold.config.loader import from_dict  # noqa: E402
from reopold.config.schema import TrainConfig  # noqa: E402
from reopold.models.vision import save_vlm  # noqa: E402
from reopold.train.checkpoint import latest_checkpoint  # noqa: E402
from reopold.train.run import train  # noqa: E402

TIMING_KEYS = {"time", "rollout_seconds", "score_seconds", "update_seconds"}


@pytest.fixture(scope="module")
def vlm_pair(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("vlms")
    processor = build_processor(build_vlm_tokenizer())
    teacher = _sharpen(build_tiny_vlm(processor.tokenizer, hidden=32, layers=2, heads=4, kv_heads=2, seed=1), 3)
    student = build_tiny_vlm(processor.tokenizer, hidden=32, layers=1, heads=4, kv_heads=2, seed=2)
    save_vlm(teacher, processor, root / "teacher")
    save_vlm(student, processor, root / "student")
    return root / "teacher", root / "student"


def _config(tmp_path, pair, **sections):
    teacher, student = pair
    config = {
        "student": {"model": str(student)},
        "teacher": {"model": str(teacher)},
        "data": {"task": "visual-addition", "eval_problems": 16, "train_problems": 200, "preflight_problems": 0},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 4, "max_new_tokens": 12},
        "optim": {"lr": 3e-3, "mini_batch_prompts": 2, "micro_batch_size": 8, "warmup_steps": 0},
        "run": {"steps": 4, "eval_every": 2, "save_every": 2, "output_dir": str(tmp_path / "runs"),
                "progress": False, "report": False, "keep_checkpoints": 10},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return from_dict(TrainConfig, config)


def _records(run_dir, kind=None):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if kind is None or r["kind"] == kind]


def _without_timings(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


@pytest.mark.parametrize("algo", ["reopold", "rkl", "rkl_sg", "grpo", "sft", "gkd"])
def test_every_algorithm_trains_on_image_prompts(tmp_path, vlm_pair, algo):
    run_dir = train(_config(tmp_path, vlm_pair, algo={"name": algo}, run={"steps": 2, "eval_every": 0,
                                                                         "save_every": 2}))
    rows = _records(run_dir, "train")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]) and not row["skipped"]
        if algo != "grpo":
            assert row["grad_norm"] > 0
    assert (latest_checkpoint(run_dir) / "model.safetensors").exists()


def test_training_lowers_held_out_reverse_kl(tmp_path, vlm_pair):
    run_dir = train(_config(tmp_path, vlm_pair, algo={"name": "rkl"},
                            run={"steps": 8, "eval_every": 8, "save_every": 8}))
    evals = _records(run_dir, "eval")
    assert [e["step"] for e in evals] == [0, 8]
    assert evals[-1]["reverse_kl"] < 0.8 * evals[0]["reverse_kl"], evals


def test_resume_is_exact_with_image_prompts(tmp_path, vlm_pair):
    config = _config(tmp_path, vlm_pair)
    run_dir = train(config)
    full = _records(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    (run_dir / "checkpoints" / "latest").write_text("step-000002\n")
    train(config, resume=str(run_dir))
    assert _without_timings(_records(run_dir)) == _without_timings(full)


def test_vision_tower_frozen_by_default(tmp_path, vlm_pair):
    from reopold.config.schema import LoraConfig
    from reopold.models.loading import apply_lora, freeze_vision, load_model

    model = load_model(str(vlm_pair[1]))
    assert freeze_vision(model) > 0
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".visual." in f".{n}")
    assert any(p.requires_grad for n, p in model.named_parameters() if "language_model" in n)
    lora = apply_lora(load_model(str(vlm_pair[1])), LoraConfig(r=2))
    adapted = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert adapted and not any("visual" in n for n in adapted)
    with_vision = apply_lora(load_model(str(vlm_pair[1])), LoraConfig(r=2), freeze_vision=False)
    assert any("visual" in n for n, p in with_vision.named_parameters() if p.requires_grad)


def test_blind_teacher_is_refused(tmp_path):
    from reopold.models.loading import resolve_model
    from reopold.models.vision import load_vlm

    model, processor = load_vlm(resolve_model("demo-visual-teacher"))
    with torch.no_grad():  # the projector outputs zeros: every image looks the same to the language model
        for p in model.model.visual.merger.parameters():
            p.zero_()
    save_vlm(model, processor, tmp_path / "blind")
    config = _config(tmp_path, (tmp_path / "blind", "demo-visual-student"), data={"preflight_problems": 4},
                     rollout={"max_new_tokens": 40})
    with pytest.raises(ValueError, match="does not look at the images"):
        train(config)


def test_text_teacher_for_a_vision_student_is_refused(tmp_path, vlm_pair):
    with pytest.raises(ValueError, match="text-only"):
        train(_config(tmp_path, ("demo-teacher", vlm_pair[1])))


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_visual_recipes_hold_the_papers_settings(size):
    from pathlib import Path

    from reopold.config.loader import load_config

    recipe = Path(__file__).resolve().parents[1] / "configs" / "recipes" / f"visual-{size}.yaml"
    config = load_config(TrainConfig, recipe)
    assert config.student.model == f"Qwen/Qwen2.5-VL-{size.upper()}-Instruct"
    assert config.teacher.model == "Qwen/Qwen2.5-VL-32B-Instruct" and config.student.freeze_vision
    assert (config.run.steps, config.rollout.samples_per_prompt, config.rollout.prompts_per_step) == (60, 12, 128)
    assert (config.optim.mini_batch_prompts, config.optim.lr, config.algo.lam, config.algo.beta) == (64, 5e-6, 0.3, 0.2)
    assert (config.algo.switch_step, config.rollout.max_new_tokens, config.rollout.temperature) == (20, 2048, 1.0)
    assert config.data.task == "image-prompts" and config.rollout.engine == "hf"


def test_image_prompt_files(tmp_path, vlm):
    import numpy as np
    from PIL import Image

    from reopold.tasks.visual import ImagePromptTask

    _, processor = vlm
    Image.fromarray(np.full((56, 56, 3), 200, np.uint8)).save(tmp_path / "a.png")
    rows = [{"problem": f"<image>find x {i}", "answer": str(i), "images": ["a.png"] * (1 + i % 2)} for i in range(20)]
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    task = ImagePromptTask(str(tmp_path / "p.jsonl"), prompt_key="problem", held_out=4)
    problems = task.problems("train", 3)
    assert len(task.problems("test", 10)) == 2 and problems[0].prompt.startswith("find x")
    assert task.check(problems[0], f"so \\boxed{{{problems[0].answer}}}")
    ids, mask, images = VisionPromptEncoder(processor).batch(problems)
    counts = [len(p.images) for p in problems]
    assert images.images_per_row.tolist() == counts and images.image_grid_thw.shape[0] == sum(counts)
    assert images.mm_token_type_ids.sum(-1).tolist() == [4 * c for c in counts]  # 4 tokens per 56x56 image
    (tmp_path / "bad.jsonl").write_text(json.dumps({"problem": "x", "answer": "1"}))
    with pytest.raises(ValueError, match="no image"):
        ImagePromptTask(str(tmp_path / "bad.jsonl"), prompt_key="problem")


def test_checkpoint_holds_the_processor_and_reopold_eval_reads_it(tmp_path, vlm_pair):
    from reopold.cli import main

    run_dir = train(_config(tmp_path, vlm_pair, run={"steps": 1, "eval_every": 0, "save_every": 1}))
    checkpoint = latest_checkpoint(run_dir)
    assert (checkpoint / "processor_config.json").exists() and (checkpoint / "chat_template.jinja").exists()
    out = tmp_path / "eval"
    main(["eval", str(checkpoint), "--task", "visual-addition", "--num-problems", "4", "--n", "1",
          "--temperature", "0", "--max-new-tokens", "8", "--out", str(out)])
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_problems"] == 4 and 0.0 <= saved["metrics"]["pass@1"] <= 1.0
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4


def test_scaling_measures_vision_models_on_image_problems(tmp_path):
    from reopold.cli import main

    out = tmp_path / "scaling"
    main(["scaling", "--model", "teacher=demo-visual-teacher", "--task", "visual-addition", "--num-problems", "4",
          "--ks", "1,2", "--out", str(out)])
    points = json.loads((out / "scaling.json").read_text())["points"]["teacher"]
    assert [p["k"] for p in points] == [1, 2]
    assert all(p["maj_at_k"] == 1.0 for p in points)  # the teacher reads every image right (sampled at T = 1)


def test_served_teacher_for_a_vision_student_is_refused(vlm_pair):
    from reopold.config.loader import ConfigError
    from reopold.train.run import check_vision_pair

    with pytest.raises(ConfigError, match="not images"):
        check_vision_pair(str(vlm_pair[1]), "served-name", served=True)
    check_vision_pair(str(vlm_pair[1]), str(vlm_pair[0]))  # same family, same image token ids: accepted
