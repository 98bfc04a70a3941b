"""Jobs: prepare the data, train the models (GPU-tagged), or run the whole pipeline.

`dagster job execute -m tinyplm_assets.definitions -j pretrain_all -c configs/demo.yaml`
"""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job

from tinyplm_assets.assets.models import GPU_OP_TAGS

TRAINING = AssetSelection.groups("training")
EVALUATION = AssetSelection.groups("evaluation")
DATA = AssetSelection.all() - TRAINING - EVALUATION

prepare_data = define_asset_job(
    "prepare_data",
    selection=DATA,
    description="Download, clean and split the corpora, train the tokenizer, write token shards.",
)

# Run tags (unlike asset op_tags) reach run launchers: the Kubernetes launcher reads
# `dagster-k8s/config`, and `tinyplm/gpu` lets a run queue or a launcher route the run to a GPU box.
train_models = define_asset_job(
    "train_models",
    selection=TRAINING,
    tags=GPU_OP_TAGS,
    description="Stage-1 and stage-2 BERT training (needs the data assets; one GPU job at a time).",
)

evaluate_models = define_asset_job(
    "evaluate_models",
    selection=EVALUATION,
    tags=GPU_OP_TAGS,
    description="The fixed MLM set, JGLUE fine-tuning of both stages and the random-init control, "
                "and the release folder with model cards (needs both checkpoints and the JGLUE downloads).",
)

pretrain_all = define_asset_job(
    "pretrain_all",
    selection=AssetSelection.all(),
    tags={"tinyplm/gpu": "1"},
    description="The whole pipeline, downloads to the evaluated release folder.",
)
