"""The tokenizer: a seeded sentence sample from JaWiki train, then MeCab + WordPiece training.

`wordpiece_tokenizer` is a folder that `AutoTokenizer.from_pretrained()` loads offline as a
`BertJapaneseTokenizer` (mecab with unidic-lite, wordpiece), plus `wordpiece.json` for the fast
encoder. Both assets are deterministic from their seeds and safe to re-run.
"""


from pathlib import Path

from dagster import AssetExecutionContext, Output, asset

from tinyplm_assets.config import TokenizerConfig, TokenizerSampleConfig, worker_count
from tinyplm_assets.metadata import flat_counts, made_from, text_sample, tokenisation_sample
from tinyplm_assets.preflight import check_run
from tinyplm_assets.resources import ArtifactStorage
from tinyplm_lib.layout import SAMPLE_FILE, SENTENCES_FILE
from tinyplm_lib.quality import read_sentences
from tinyplm_lib.tokens.tokenizer import sample_sentences, train_tokenizer


@asset(group_name="tokenizer", kinds={"text"})
def tokenizer_sample(context: AssetExecutionContext, config: TokenizerSampleConfig,
                     storage: ArtifactStorage, jawiki_train: Path) -> Output:
    """A seeded sample of JaWiki training sentences (the original used an unseeded `shuf`)."""
    check_run(context)
    staging = storage.staging_dir("tokenizer_sample")
    count = sample_sentences(jawiki_train / SENTENCES_FILE, staging / SAMPLE_FILE, config.sample_size,
                             config.seed)
    return Output(staging, metadata={"sentences": count, "seed": config.seed,
                                     "sample": text_sample(staging / SAMPLE_FILE)})


@asset(group_name="tokenizer", kinds={"huggingface"})
def wordpiece_tokenizer(context: AssetExecutionContext, config: TokenizerConfig,
                        storage: ArtifactStorage, tokenizer_sample: Path) -> Output:
    """MeCab (fugashi + unidic-lite) segmentation, then WordPiece trained with `tokenizers`."""
    check_run(context)
    staging = storage.staging_dir("wordpiece_tokenizer")
    info = train_tokenizer(tokenizer_sample / SAMPLE_FILE, staging, config.to_settings(),
                           workers=worker_count(config.workers))
    context.log.info(f"tokenizer: {info}")
    # A few sample sentences through the saved folder, as users' AutoTokenizer will split them.
    sample = tokenisation_sample(staging, read_sentences(tokenizer_sample / SAMPLE_FILE, 3))
    return Output(staging, metadata={**flat_counts(info), "tokenisation_sample": sample,
                                     **made_from(trained_on=("tokenizer_sample", tokenizer_sample))})
