"""One rank of a data-parallel REOPOLDTrainer run on CPU (gloo), launched by tests/test_integrations_trl.py.

argv: student_dir teacher_dir out_dir. Writes out_dir/rank<R>.json: per generation batch, the phase, the kept-token
count and tau_beta the trainer used, and this rank's valid entropies and rewards, for the test to recompute.
"""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

from reopold.integrations.trl import REOPOLDConfig, REOPOLDTrainer

torch.set_num_threads(1)


class RecordingTrainer(REOPOLDTrainer):
    records: list

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        mask = output["completion_mask"].bool()
        self.records.append({
            "step": self.state.global_step,
            "refinement": bool(output["reopold_refinement"]),
            "num_items": float(output["num_items_in_batch"]),
            "threshold": float(output["reopold_threshold"]),
            "entropy": output["entropy"][mask].tolist(),
            "rewards": (output["teacher_logprobs"] - output["old_logprobs"])[mask].tolist(),
        })  # fmt: skip
        return output


def main(student: str, teacher: str, out: str) -> None:
    prompts = [f"{a}+{b}=" for a in range(8) for b in range(8)]
    trainer = RecordingTrainer(
        model=AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32),
        teacher_model=AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32),
        args=REOPOLDConfig(
            output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
            switch_step=2, max_completion_length=8, learning_rate=3e-3, use_cpu=True, bf16=False,
            gradient_checkpointing=False, report_to=[], save_strategy="no", seed=0, disable_tqdm=True,
        ),  # fmt: skip
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=AutoTokenizer.from_pretrained(student),
    )
    trainer.records = []
    trainer.train()
    rank = trainer.accelerator.process_index
    Path(out, f"rank{rank}.json").write_text(json.dumps(trainer.records))


if __name__ == "__main__":
    main(*sys.argv[1:4])
