"""The two BERT checkpoints: stage 1 from scratch on cc100-ja, stage 2 continued on JaWiki.

Hugging Face folders with `metrics.json`, trained in the `gpu` pool (one at a time) with the GPU
request in their op tags. Checkpoints go to the same store (`checkpoints/<asset>/step-N`, local or
S3), so a killed stage resumes from its last checkpoint when re-materialised, here or elsewhere.
"""


from pathlib import Path

from dagster import AssetExecutionContext, Output, asset

from tinyplm_assets.config import Stage1Config, Stage2Config
from tinyplm_assets.metadata import flat_counts, made_from, png_markdown
from tinyplm_assets.preflight import check_run
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_assets.training_launch import run_stage
from tinyplm_lib.layout import LOSS_CURVE_FILE

# Read by dagster-k8s (pod resources: one GPU; a stage with distributed.processes_per_node N needs the limit
# raised to N in its op tags). The docker deployment's run launcher reads no tags: it requests the
# GPUs for every run container instead.
GPU_OP_TAGS = {
    "tinyplm/gpu": "1",
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}},
}


def _result(metrics: dict, out_dir: Path, made_from_links: dict) -> Output:
    metadata = flat_counts({k: v for k, v in metrics.items() if k != "history"})
    metadata.update(made_from_links)  # the exact data, tokenizer (and start model) it came from
    metadata["device"] = metrics["device"]
    # Inline, so the UI shows the curve without access to the artifact store (~10 kB).
    metadata["loss_curve"] = png_markdown("loss curve", (out_dir / LOSS_CURVE_FILE).read_bytes())
    return Output(out_dir, metadata=metadata)


@asset(group_name="training", pool="gpu", op_tags=GPU_OP_TAGS, kinds={"pytorch"})
def bert_stage1_cc100(context: AssetExecutionContext, config: Stage1Config, storage: ArtifactStorage,
                      cc100_ja_tokens: Path, wordpiece_tokenizer: Path) -> Output:
    """BERT MLM trained from scratch on cc100-ja.

    Re-running after a finished run retrains from scratch; after an interrupted one it resumes
    from the last checkpoint (if the settings and data are unchanged).
    """
    check_run(context)
    metrics, out_dir = run_stage(context, config, storage, "bert_stage1_cc100", tokens=cc100_ja_tokens,
                                 tokenizer=wordpiece_tokenizer)
    return _result(metrics, out_dir, made_from(trained_on=("cc100_ja_tokens", cc100_ja_tokens),
                                               tokenizer=("wordpiece_tokenizer", wordpiece_tokenizer)))


@asset(group_name="training", pool="gpu", op_tags=GPU_OP_TAGS, kinds={"pytorch"})
def bert_stage2_jawiki(context: AssetExecutionContext, config: Stage2Config, storage: ArtifactStorage,
                       bert_stage1_cc100: Path, jawiki_tokens: Path, wordpiece_tokenizer: Path) -> Output:
    """Stage 1 continued on JaWiki: the model users take home. Resumes like stage 1."""
    check_run(context)
    metrics, out_dir = run_stage(context, config, storage, "bert_stage2_jawiki", tokens=jawiki_tokens,
                                 tokenizer=wordpiece_tokenizer, init_from=bert_stage1_cc100)
    return _result(metrics, out_dir, made_from(trained_on=("jawiki_tokens", jawiki_tokens),
                                               tokenizer=("wordpiece_tokenizer", wordpiece_tokenizer),
                                               initialised_from=("bert_stage1_cc100", bert_stage1_cc100)))
