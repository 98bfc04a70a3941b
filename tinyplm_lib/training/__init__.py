"""Training: one MLM stage on packed token shards, in-process or under torchrun (DDP).

`stage.train_stage` runs the phases `prepare` → `loop` → finish; around them: the settings and their
checks (`arguments`), the model and its evaluation (`model`), the checkpointed progress (`state`,
`checkpoints`), packing and batch-time masking, the distributed world and the training curves.
"""
