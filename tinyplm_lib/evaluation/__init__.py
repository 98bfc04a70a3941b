"""Evaluation: what a checkpoint is worth (the fixed MLM evaluation set, JGLUE fine-tuning, the model card)."""
