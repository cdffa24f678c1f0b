"""Models: loading Hugging Face models and tokenizers, LoRA and merging (``loading``), and teacher-forced scoring of a
rollout under any causal LM (``scorer``)."""
