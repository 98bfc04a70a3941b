"""The jobs a fault-bench child runs, one library call each, and the child's entry point.

    python -m bench.faults.jobs JOB '{json args}'    # started by bench/faults/children.py

The child prints `RESULT {json}` on success; the scenario reads it back with child_result().
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.faults.children import RESULT_PREFIX
from bench.faults.lab import REPO_ROOT
from tinyplm_lib.layout import SENTENCES_FILE

MODEL_CONFIG = REPO_ROOT / "configs" / "model" / "bert-demo.json"
TRAIN_ARGS = REPO_ROOT / "configs" / "train" / "demo-stage1.json"


def _job_download(args: dict) -> dict:
    from tinyplm_lib.downloads.download import download

    return download(args["url"], Path(args["dest"]), progress=False, backoff=0.0, max_retries=args.get("retries", 0),
                    chunk_size=args.get("chunk_size", 1 << 16)).to_dict()


def _job_corpus_step(args: dict) -> dict:
    """An asset's whole step: staging dir -> corpus build -> atomic publish of both splits."""
    from tinyplm_lib.corpora.cc100 import Cc100Settings, build_cc100_corpus
    from tinyplm_lib.corpora.jawiki import JawikiSettings, build_jawiki_corpus
    from tinyplm_lib.store.artifacts import LocalArtifactStore

    store = LocalArtifactStore(Path(args["root"]))
    staged = {split: store.staging_dir(f"{args['corpus']}_{split}") for split in ("train", "validation")}
    if args["corpus"] == "cc100":
        stats = build_cc100_corpus(Path(args["raw"]), staged["train"] / SENTENCES_FILE,
                                   staged["validation"] / SENTENCES_FILE, Cc100Settings(**args["settings"]), workers=1)
    else:
        stats = build_jawiki_corpus(Path(args["raw"]), staged["train"] / SENTENCES_FILE,
                                    staged["validation"] / SENTENCES_FILE, JawikiSettings(**args["settings"]),
                                    workers=1)
    manifests = {split: store.publish(f"{args['corpus']}_{split}", path).manifest for split, path in staged.items()}
    return {"manifests": manifests, "lines_train": stats.lines_train}


def _job_shards(args: dict) -> dict:
    from tinyplm_lib.tokens.shard_writer import encode_corpus

    meta = encode_corpus(Path(args["text"]), Path(args["tokenizer"]), Path(args["out"]), workers=1,
                         shard_lines=args["shard_lines"])
    return {key: meta[key] for key in ("shards_encoded", "shards_reused", "num_tokens")}


def _job_publish(args: dict) -> dict:
    from tinyplm_lib.store.artifacts import LocalArtifactStore

    return LocalArtifactStore(Path(args["root"])).publish(args["key"], Path(args["source"])).manifest


def _job_s3_publish(args: dict) -> dict:
    import boto3

    from tinyplm_lib.store.s3 import S3ArtifactStore

    client = boto3.client("s3", endpoint_url=args["endpoint"])
    store = S3ArtifactStore(Path(args["cache"]), client, args["bucket"], args["prefix"])
    return store.publish(args["key"], Path(args["source"])).manifest


def _job_hold_staging(args: dict) -> dict:
    """Claim a staging dir, half-fill it, and wait to be killed (a crashed or a live writer)."""
    from tinyplm_lib.store.artifacts import LocalArtifactStore

    staging = LocalArtifactStore(Path(args["root"])).staging_dir(args["label"])
    (staging / SENTENCES_FILE).write_text("half-written by another run\n", encoding="utf-8")
    # Renamed into place: the parent polls for the file and must never read it empty.
    ready = Path(args["ready"])
    ready.with_name(ready.name + ".tmp").write_text(str(staging), encoding="utf-8")
    ready.with_name(ready.name + ".tmp").replace(ready)
    time.sleep(600)
    return {}


def _job_train(args: dict) -> dict:
    from tinyplm_lib.training.checkpoints import LocalCheckpointSink
    from tinyplm_lib.training.stage import RuntimeOptions, StageOptions, train_stage

    data, pace = Path(args["data"]), args["pace"]
    options = StageOptions(model_config=MODEL_CONFIG, training_args=TRAIN_ARGS, max_seq_length=64,
                           overrides={"max_steps": args["steps"], "save_steps": args["save_steps"],
                                      "logging_steps": args["save_steps"]})
    metrics = train_stage(data / "shards" / "train", data / "shards" / "validation", data / "tok", Path(args["out"]),
                          options, print, checkpoints=LocalCheckpointSink(Path(args["checkpoints"])),
                          on_step=lambda step: time.sleep(pace), runtime=RuntimeOptions(dataloader_workers=0))
    return {key: metrics[key] for key in ("global_step", "eval_loss", "resumed_from_step")}


def _job_limited(args: dict) -> dict:
    """Job `inner` under a file-size limit (`fsize` bytes: RLIMIT_FSIZE, a write past it is EFBIG);
    a TinyPLMError it raises is the result: {"error", "message", "path", "needed", "free", "limit"}."""
    import resource

    from tinyplm_lib.errors import TinyPLMError

    before = resource.getrlimit(resource.RLIMIT_FSIZE)
    if args.get("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (args["fsize"], before[1]))
    try:
        return {"result": JOBS[args["inner"]](args)}
    except TinyPLMError as exc:
        return {"error": type(exc).__name__, "message": str(exc),
                **{name: getattr(exc, name, None) for name in ("path", "needed", "free", "limit")}}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, before)  # the RESULT line is written after this


JOBS: dict[str, Callable[[dict], dict]] = {
    "download": _job_download, "corpus_step": _job_corpus_step, "shards": _job_shards,
    "publish": _job_publish, "s3_publish": _job_s3_publish, "hold_staging": _job_hold_staging,
    "train": _job_train, "limited": _job_limited,
}


if __name__ == "__main__":
    result = JOBS[sys.argv[1]](json.loads(sys.argv[2]))
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
