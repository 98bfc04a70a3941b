"""Token datasets: each corpus split encoded once into uint16 token shards read by memory map.

`cc100_ja_tokens` / `jawiki_tokens` hold `train/` and `validation/` shard folders (see
`tinyplm_lib.tokens.shards`), so training never tokenises text. Deterministic and safe to re-run.
"""


from pathlib import Path

from dagster import AssetExecutionContext, AssetIn, Output, asset

from tinyplm_assets.config import TokenShardsConfig, worker_count
from tinyplm_assets.metadata import decoded_sample, made_from
from tinyplm_assets.preflight import check_run
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_lib.layout import SENTENCES_FILE, TRAIN_DIR, VALIDATION_DIR
from tinyplm_lib.tokens.shard_writer import encode_corpus


def _token_asset(name: str, corpus: str, description: str):
    @asset(name=name, group_name="tokens", description=description, kinds={"numpy"},
           ins={"train": AssetIn(f"{corpus}_train"), "validation": AssetIn(f"{corpus}_validation"),
                "tokenizer": AssetIn("wordpiece_tokenizer")})
    def _tokens(context: AssetExecutionContext, config: TokenShardsConfig, storage: ArtifactStorage,
                train: Path, validation: Path, tokenizer: Path) -> Output:
        check_run(context)
        staging = storage.staging_dir(name)
        metadata: dict = {}
        for split, folder, corpus_dir in (("train", TRAIN_DIR, train), ("validation", VALIDATION_DIR, validation)):
            meta = encode_corpus(corpus_dir / SENTENCES_FILE, tokenizer, staging / folder,
                                 workers=worker_count(config.workers), shard_lines=config.shard_lines)
            metadata.update({f"{split}.{key}": value for key, value in meta.items()
                             if isinstance(value, (int, float)) and not isinstance(value, bool)})
        metadata["decoded_sample"] = decoded_sample(staging / VALIDATION_DIR, tokenizer)
        metadata.update(made_from(train_text=(f"{corpus}_train", train),
                                  validation_text=(f"{corpus}_validation", validation),
                                  tokenizer=("wordpiece_tokenizer", tokenizer)))
        return Output(staging, metadata=metadata)

    return _tokens


cc100_ja_tokens = _token_asset("cc100_ja_tokens", "cc100_ja", "cc100-ja train/validation as token shards.")
jawiki_tokens = _token_asset("jawiki_tokens", "jawiki", "JaWiki train/validation as token shards.")
