"""Evaluation: what each checkpoint is worth, measured the same way for every stage and recipe.

`mlm_eval_set` fixes the MLM positions once (validation sentences one per sequence, seeded masks).
`bert_stage1_cc100_eval`, `bert_stage2_jawiki_eval` and `bert_control_eval` (the stage-2
architecture from random initialisation, same budget) score the fixed MLM set and fine-tune JSTS
and JCommonsenseQA, writing each dev prediction beside its metrics. `bert_release` is the folder a
user uploads: both checkpoints with a model card each, and the plots. The scoring and fine-tuning
modules (torch, transformers) are imported when a step runs: the code location imports this one.
"""


import json
import shutil
from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, AssetKey, MetadataValue, Output, asset

from tinyplm_assets.assets.models import GPU_OP_TAGS
from tinyplm_assets.config import EvaluationConfig, MlmEvalSetConfig
from tinyplm_assets.metadata import made_from, png_markdown
from tinyplm_assets.preflight import check_run
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_lib.evaluation.release import EVALUATION_FILE, JGLUE_TASKS, ReleaseInputs, jglue_file, write_release
from tinyplm_lib.files import atomic_write_json
from tinyplm_lib.layout import VALIDATION_DIR


@asset(group_name="evaluation", kinds={"numpy"})
def mlm_eval_set(context: AssetExecutionContext, config: MlmEvalSetConfig, storage: ArtifactStorage,
                 cc100_ja_tokens: Path, jawiki_tokens: Path, wordpiece_tokenizer: Path) -> Output:
    """Validation sentences of both corpora, one per sequence, with masks drawn once from a seed.

    Every checkpoint, stage and recipe is scored on these same positions (`*_eval` assets).
    """
    check_run(context)
    from tinyplm_lib.evaluation.mlm import build_mlm_eval_set

    staging = storage.staging_dir("mlm_eval_set")
    meta = build_mlm_eval_set({"cc100": cc100_ja_tokens / VALIDATION_DIR, "jawiki": jawiki_tokens / VALIDATION_DIR},
                              wordpiece_tokenizer, staging, config.to_settings())
    metadata = {f"{corpus}.{key}": value for corpus, counts in meta["corpora"].items()
                for key, value in counts.items() if isinstance(value, int) and not isinstance(value, bool)}
    return Output(staging, metadata={**metadata, **made_from(tokenizer=("wordpiece_tokenizer", wordpiece_tokenizer))})


def _evaluate(context: AssetExecutionContext, config: EvaluationConfig, storage: ArtifactStorage, name: str,
              kind: str, model: Path, mlm_eval_set: Path, jglue: dict[str, Path]) -> Output:
    """Fixed-set MLM scores, then one fine-tuning run per JGLUE task, into one folder.

    `kind` says what is fine-tuned from the model folder (`ModelSource`: "pretrained" or "control").
    """
    from tinyplm_lib.evaluation.jglue import ModelSource, finetune
    from tinyplm_lib.evaluation.mlm import evaluate_mlm_folder

    source = ModelSource(Path(model), kind)
    staging = storage.staging_dir(name)
    settings = config.jglue_settings()
    summary: dict = {"model_source": source.kind, "mlm": {}, "jglue": {}}
    if source.kind == "pretrained":  # the control's MLM scores would be a random model's
        summary["mlm"] = evaluate_mlm_folder(source.path, mlm_eval_set, batch_size=config.mlm_batch_size)
    for task in JGLUE_TASKS:
        raw = jglue[task]
        summary["jglue"][task] = finetune(task, source, source.path, jglue_file(raw, "train"), jglue_file(raw, "dev"),
                                          staging / task, settings, log=context.log.info)
    atomic_write_json(staging / EVALUATION_FILE, summary, indent=1)
    metadata: dict = {f"mlm.{corpus}.{key}": scores[key] for corpus, scores in summary["mlm"].items()
                      for key in ("accuracy", "loss")}
    for task, metrics in summary["jglue"].items():
        # A score is None when undefined (a model that predicts one constant): left out of the metadata.
        metadata.update({f"{task}.{key}": metrics[key] for key in ("pearson", "spearman", "accuracy", "steps",
                                                                   "train_examples", "seconds")
                         if metrics.get(key) is not None})
    metadata["fine_tuning_settings"] = MetadataValue.json(summary["jglue"][JGLUE_TASKS[0]]["settings"])
    return Output(staging, metadata=metadata)


def _evaluation_asset(name: str, checkpoint: str, kind: str, description: str):
    """One checkpoint's evaluation asset; `kind` ("pretrained" or "control") says what is fine-tuned from it."""

    @asset(name=name, group_name="evaluation", pool="gpu", op_tags=GPU_OP_TAGS, kinds={"pytorch"},
           description=description, ins={"model": AssetIn(checkpoint)})
    def _eval(context: AssetExecutionContext, config: EvaluationConfig, storage: ArtifactStorage, model: Path,
              mlm_eval_set: Path, jglue_jsts_raw: Path, jglue_jcommonsenseqa_raw: Path) -> Output:
        check_run(context)
        return _evaluate(context, config, storage, name, kind, model, mlm_eval_set,
                         {"jsts": jglue_jsts_raw, "jcommonsenseqa": jglue_jcommonsenseqa_raw})

    return _eval


bert_stage1_cc100_eval = _evaluation_asset(
    "bert_stage1_cc100_eval", "bert_stage1_cc100", "pretrained",
    "Stage 1 on the fixed MLM set, and fine-tuned on JSTS and JCommonsenseQA (dev scores, predictions).")
bert_stage2_jawiki_eval = _evaluation_asset(
    "bert_stage2_jawiki_eval", "bert_stage2_jawiki", "pretrained",
    "Stage 2 on the fixed MLM set, and fine-tuned on JSTS and JCommonsenseQA (dev scores, predictions).")
bert_control_eval = _evaluation_asset(
    "bert_control_eval", "bert_stage2_jawiki", "control",
    "The control: stage 2's architecture and tokenizer from random weights, fine-tuned on JSTS and "
    "JCommonsenseQA with the same budget. What pretraining bought is the gap to the stages' scores.")


def _upstream_metadata(context: AssetExecutionContext, asset_name: str) -> dict:
    """The latest materialisation's metadata of an asset this one only reads counts from (no load)."""
    event = context.instance.get_latest_materialization_event(AssetKey(asset_name))
    if event is None or event.asset_materialization is None:
        return {}
    return {key: value.value for key, value in event.asset_materialization.metadata.items()}


@asset(group_name="evaluation", kinds={"huggingface"},
       deps=["cc100_ja_tokens", "jawiki_tokens", "jawiki_raw", "cc100_ja_raw"])
def bert_release(context: AssetExecutionContext, storage: ArtifactStorage, bert_stage1_cc100: Path,
                 bert_stage2_jawiki: Path, bert_stage1_cc100_eval: Path, bert_stage2_jawiki_eval: Path,
                 bert_control_eval: Path) -> Output:
    """Both checkpoints as Hugging Face folders with a model card (README.md) each, and the plots.

    The cards' model-index carries the fixed-set MLM and JGLUE dev scores; the corpus counts come
    from the token assets' recorded metadata, so their shards are not loaded here.
    """
    check_run(context)
    staging = storage.staging_dir("bert_release")
    inputs = ReleaseInputs(
        models={"stage1": bert_stage1_cc100, "stage2": bert_stage2_jawiki},
        evaluations={"stage1": bert_stage1_cc100_eval, "stage2": bert_stage2_jawiki_eval,
                     "control": bert_control_eval},
        upstream={name: _upstream_metadata(context, name)
                  for name in ("cc100_ja_tokens", "jawiki_tokens", "jawiki_raw", "cc100_ja_raw")},
    )
    summary = write_release(inputs, staging, copy=shutil.copy2)
    metadata: dict = {"models": MetadataValue.json(summary["models"])}
    for key, png in summary["plots"].items():
        metadata[key] = png_markdown(key, (staging / png).read_bytes())
    metadata["scores"] = MetadataValue.md(summary["scores_table"])
    context.log.info(json.dumps(summary["models"]))
    return Output(staging, metadata=metadata)
