"""On-disk names: every file or folder name an artifact holds, defined once.

Assets, the library, checks and benchmarks import these rather than spelling the names, so a
reader can find every producer and consumer of a file by its constant.
"""

# Every artifact (store/).
MANIFEST_FILE = "_manifest.json"

# Corpus splits (corpora/): one sentence or line per line, LF-terminated UTF-8.
SENTENCES_FILE = "sentences.txt"
# tokenizer_sample: the seeded sample of JaWiki training sentences.
SAMPLE_FILE = "sample.txt"

# Tokenizer folder (tokens/).
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WORDPIECE_FILE = "wordpiece.json"
TOKENIZER_INFO_FILE = "tinyplm_tokenizer.json"

# Token shards (tokens/): one folder per split, with a meta file.
TRAIN_DIR = "train"
VALIDATION_DIR = "validation"
SHARDS_META_FILE = "meta.json"

# Model folders and checkpoints (training/).
MODEL_CONFIG_FILE = "config.json"
MODEL_WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"
TRAINING_SETTINGS_FILE = "training_settings.json"
LOSS_CURVE_FILE = "loss_curve.png"
TENSORBOARD_DIR = "tensorboard"  # the event files of training.curves.write_tensorboard
# Inside a model folder while it trains (removed before it is published): checkpoint scratch and
# TrainingArguments' output_dir.
TRAINER_DIR = "trainer"

# Evaluation folders (evaluation/): one per JGLUE task, each with metrics.json beside this.
PREDICTIONS_FILE = "predictions.jsonl"  # one row per dev example: id, label, prediction
