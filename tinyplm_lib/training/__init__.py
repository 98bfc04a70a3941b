"""Training: one MLM stage on packed token shards, in-process or under torchrun (DDP).

The stage and its phases, packing and batch-time masking, the distributed world, checkpoints
(safetensors + JSON, resumable) and the TrainingArguments files of the original.
"""
