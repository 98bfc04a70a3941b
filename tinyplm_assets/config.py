"""Run-config classes: Dagster's view of the library's settings dataclasses (one source of defaults).

`to_settings()` / `to_options()` convert to the library's types, here and nowhere else; the library's
`validate()` rejects out-of-range values. Relative paths (config files, `file://./` URLs) resolve
against the current directory, then the project root. The code location imports this module, so it
stays clear of torch and transformers: what needs them is imported by the method that uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from dagster import Config
from pydantic import Field

from tinyplm_assets.environment import PROJECT_ROOT
from tinyplm_assets.k8s import KubernetesConfig, rendezvous
from tinyplm_lib.corpora.cc100 import Cc100Settings
from tinyplm_lib.corpora.jawiki import JawikiSettings
from tinyplm_lib.downloads.dumps import CIRRUSSEARCH_INDEX_URL
from tinyplm_lib.errors import ConfigError
from tinyplm_lib.evaluation.mlm_settings import MlmEvalSettings
from tinyplm_lib.parallel import available_cores
from tinyplm_lib.tokens.tokenizer import TokenizerSettings
from tinyplm_lib.training.arguments import RuntimeOptions, StageOptions
from tinyplm_lib.training.torchrun import split_endpoint

if TYPE_CHECKING:
    from tinyplm_lib.evaluation.jglue import JglueSettings

_CC100 = Cc100Settings()
_JAWIKI = JawikiSettings()
_TOKENIZER = TokenizerSettings()


def resolve_path(value: str, setting: str) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    for base in (Path.cwd(), PROJECT_ROOT):
        if (base / path).exists():
            return (base / path).resolve()
    raise ConfigError(setting, f"{value} not found in {Path.cwd()} or {PROJECT_ROOT}")


def resolve_url(url: str) -> str:
    """`file://./relative/path` → an absolute file URL; other URLs unchanged."""
    parts = urlsplit(url)
    if parts.scheme == "file" and parts.netloc in (".", ".."):
        return resolve_path(parts.netloc + parts.path, "url").as_uri()
    return url


def worker_count(workers: int) -> int:
    """0 means every core this process may use."""
    return workers if workers > 0 else available_cores()


class DownloadConfig(Config):
    url: str = Field(description="http(s)://, file:// (file://./x is relative to the project) or s3:// URL")
    sha256: Optional[str] = Field(default=None, description="expected sha256 of the file, if published")
    checksum_url: Optional[str] = Field(
        default=None, description="checksum file the source publishes (SHA256SUMS, md5sums.txt, <file>.sha256); "
        "fetched every run, the file must match its entry"
    )
    progress: bool = Field(default=True, description="show a tqdm progress bar on stderr")


class JawikiDownloadConfig(DownloadConfig):
    """A pinned `url` wins; without one, `dump_date` picks a CirrusSearch dump from `index_url`."""

    url: Optional[str] = Field(
        default=None, description="pinned dump URL (http(s)://, file://, s3://); when set, dump_date is ignored"
    )
    dump_date: str = Field(
        default="latest",
        description="'latest' (newest dump whose file is listed in index_url) or a YYYYMMDD dump date",
    )
    index_url: str = Field(default=CIRRUSSEARCH_INDEX_URL, description="CirrusSearch dump index (HTML listing)")


JGLUE_DATASETS_URL = "https://raw.githubusercontent.com/yahoojapan/JGLUE/main/datasets"


def jglue_url(task: str, split: str) -> str:
    """Where the JGLUE repository publishes a v1.3 file: `<task>-v1.3/<split>-v1.3.json`."""
    return f"{JGLUE_DATASETS_URL}/{task}-v1.3/{split}-v1.3.json"


class JglueDownloadConfig(Config):
    """One JGLUE task's train and dev ("valid") files; the defaults are the upstream v1.3 files."""

    train_url: str = Field(description="train split: http(s)://, file:// or s3:// URL (.json or .json.gz)")
    dev_url: str = Field(description="dev split (JGLUE's 'valid'), scored by the evaluation assets")
    train_sha256: Optional[str] = Field(default=None, description="expected sha256 of the train file")
    dev_sha256: Optional[str] = Field(default=None, description="expected sha256 of the dev file")
    progress: bool = Field(default=True, description="show a tqdm progress bar on stderr")


class Cc100CorpusConfig(Config):
    max_lines: int = Field(default=_CC100.max_lines, description="first N non-empty lines read")
    max_validation_lines: int = _CC100.max_validation_lines
    validation_doc_fraction: Optional[float] = Field(
        default=_CC100.validation_doc_fraction,
        description="share of documents drawn for validation; None = 1.25 × max_validation_lines / max_lines",
    )
    seed: int = _CC100.seed
    max_bad_records: int = Field(
        default=_CC100.max_bad_records,
        description="bad lines (invalid UTF-8, over max_record_bytes) skipped and reported before "
                    "the step fails; 0 = any bad line fails",
    )
    max_record_bytes: int = Field(default=_CC100.max_record_bytes,
                                  description="a longer line (bytes) is a bad record")
    dedup: bool = Field(default=_CC100.dedup,
                        description="drop every later exact repeat of a line (after NFKC and strip), so "
                                    "train and validation share no line; false = the original's corpus")
    workers: int = Field(default=0, description="cleaning processes; 0 = all cores")

    def to_settings(self) -> Cc100Settings:
        settings = Cc100Settings(**self.model_dump(exclude={"workers"}))
        settings.validate()
        return settings


class JawikiCorpusConfig(Config):
    max_documents: Optional[int] = Field(default=_JAWIKI.max_documents, description="namespace-0 documents read")
    validation_fraction: float = _JAWIKI.validation_fraction
    seed: int = _JAWIKI.seed
    min_chars: int = _JAWIKI.min_chars
    max_chars: int = _JAWIKI.max_chars
    max_bad_records: int = Field(
        default=_JAWIKI.max_bad_records,
        description="bad dump lines (malformed JSON, invalid UTF-8, missing fields, over "
                    "max_record_bytes, unpaired index lines) skipped and reported before the step "
                    "fails; 0 = any bad line fails",
    )
    max_record_bytes: int = Field(default=_JAWIKI.max_record_bytes,
                                  description="a longer dump line (bytes) is a bad record")
    workers: int = Field(default=0, description="parsing and cleaning processes; 0 = all cores")

    def to_settings(self) -> JawikiSettings:
        settings = JawikiSettings(**self.model_dump(exclude={"workers"}))
        settings.validate()
        return settings


class TokenizerSampleConfig(Config):
    sample_size: int = Field(default=_TOKENIZER.sample_size, description="sentences sampled from JaWiki train")
    seed: int = _TOKENIZER.seed


class TokenizerConfig(Config):
    vocab_size: int = _TOKENIZER.vocab_size
    limit_alphabet: int = _TOKENIZER.limit_alphabet
    min_frequency: int = _TOKENIZER.min_frequency
    num_unused: int = _TOKENIZER.num_unused
    model_max_length: int = _TOKENIZER.model_max_length
    workers: int = Field(default=0, description="MeCab processes; 0 = all cores")

    def to_settings(self) -> TokenizerSettings:
        settings = TokenizerSettings(**self.model_dump(exclude={"workers"}))
        settings.validate()
        return settings


class TokenShardsConfig(Config):
    workers: int = Field(default=0, description="encoding processes; 0 = all cores")
    shard_lines: int = Field(default=1_000_000, description="sentences per shard file")


_OVERRIDABLE = ("max_steps", "learning_rate", "per_device_train_batch_size")
_RUNTIME = RuntimeOptions()


class RuntimeConfig(Config):
    """Speed-only settings (see `tinyplm_lib.training.stage.RuntimeOptions`): not part of the results."""

    precision: str = Field(default=_RUNTIME.precision, description="auto | bf16 | fp16 | fp32")
    tf32: bool = _RUNTIME.tf32
    compile: bool = Field(default=_RUNTIME.compile, description="torch.compile the encoder")
    dataloader_workers: int = _RUNTIME.dataloader_workers
    attention: str = Field(default=_RUNTIME.attention,
                           description="auto (tinyplm_cpu on CPU, sdpa on GPU) | tinyplm_cpu | eager | sdpa")

    def to_options(self) -> RuntimeOptions:
        return RuntimeOptions(**self.model_dump())


LAUNCHERS = ("local", "kubernetes")


class DistributedConfig(Config):
    """How a stage's training processes are laid out (`torchrun`, DDP); see `tinyplm_lib.training.distributed`.

    `nodes` torchrun agents (machines) with `processes_per_node` workers each; one node keeps the static
    rendezvous on `master_addr:master_port`, several join a c10d rendezvous on `rdzv_endpoint`.
    """

    nodes: int = Field(default=1, description="machines, one torchrun agent each; above 1 they join a c10d "
                                              "rendezvous on rdzv_endpoint")
    processes_per_node: int = Field(default=0, description="workers per node; 0 = one per visible GPU (shared out "
                                                           "among local nodes), else 1. More than one process in "
                                                           "all: torchrun (gloo on CPU)")
    rdzv_endpoint: str = Field(default="", description="c10d rendezvous host:port (nodes > 1); required with the "
                                                       "kubernetes launcher, '' with the local one = a free port "
                                                       "on 127.0.0.1")
    rdzv_id: str = Field(default="", description="c10d rendezvous id; '' = the Dagster run id (a re-run gets "
                                                 "a new one)")
    launcher: str = Field(default="local", description="local: every node's agent on this machine (several nodes "
                                                       "emulated on loopback); kubernetes: one pod per node")
    master_addr: str = Field(default="127.0.0.1", description="torchrun rendezvous address (one node)")
    master_port: int = Field(default=0, description="torchrun rendezvous port (one node); 0 = a free one")
    torchrun_args: list[str] = Field(default_factory=list, description="extra torchrun arguments, as they are")
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig,
                                         description="the training pods of launcher kubernetes")

    def check(self) -> None:
        """Raise a ConfigError naming the first field out of range or at odds with another."""
        if self.nodes < 1:
            raise ConfigError("distributed.nodes", f"must be >= 1, got {self.nodes}")
        if self.processes_per_node < 0:
            raise ConfigError("distributed.processes_per_node", f"must be >= 0, got {self.processes_per_node}")
        if self.launcher not in LAUNCHERS:
            raise ConfigError("distributed.launcher", f"{self.launcher!r}: use {' or '.join(LAUNCHERS)}")
        if self.nodes == 1:
            for name in ("rdzv_endpoint", "rdzv_id"):
                if getattr(self, name):
                    raise ConfigError(f"distributed.{name}", "used only with nodes > 1 (one node rendezvouses "
                                                             "on master_addr:master_port)")
        if self.rdzv_endpoint:
            split_endpoint(self.rdzv_endpoint)
        elif self.nodes > 1 and self.launcher == "kubernetes":
            raise ConfigError("distributed.rdzv_endpoint", "required with launcher kubernetes: host:port of "
                                                           "the pod (service) that hosts the rendezvous")
        if self.launcher == "kubernetes":
            if self.processes_per_node == 0:
                raise ConfigError("distributed.processes_per_node", "set it with launcher kubernetes: the pods' "
                                                                    "GPUs are not visible from here")
            self.kubernetes.validate_for(self.nodes)
            self.kubernetes.check_processes(self.processes_per_node)
            if self.nodes > 1:
                rendezvous(self.rdzv_endpoint)  # the host must name the Service that selects node 0's pod

    def resolve(self) -> int:
        """Processes per node: the setting, or one per GPU this machine shares among its local nodes (else 1)."""
        self.check()
        if self.processes_per_node:
            return self.processes_per_node
        from tinyplm_lib.training.distributed import default_processes  # torch: it counts the GPUs

        return max(1, default_processes() // self.nodes)


class TrainingStageConfig(Config):
    model_config_path: str = Field(
        default="configs/model/bert-tiny-custom.json", description="HF BertConfig JSON"
    )
    training_args_path: str = Field(description="HF TrainingArguments JSON (run_mlm style accepted)")
    max_seq_length: Optional[int] = Field(default=None, description="None: the JSON's max_seq_length or 128")
    max_eval_sequences: int = Field(default=10_000, description="validation sequences evaluated")
    max_steps: Optional[int] = Field(default=None, description="overrides the JSON's max_steps")
    learning_rate: Optional[float] = Field(default=None, description="overrides the JSON's learning_rate")
    per_device_train_batch_size: Optional[int] = Field(default=None, description="overrides the JSON's")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig, description="speed-only settings")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig,
                                           description="data-parallel nodes and processes (torchrun)")

    def to_options(self, init_from: Path | None = None) -> StageOptions:
        return StageOptions(
            model_config=resolve_path(self.model_config_path, "model_config_path"),
            training_args=resolve_path(self.training_args_path, "training_args_path"),
            init_from=init_from,
            max_seq_length=self.max_seq_length,
            max_eval_sequences=self.max_eval_sequences,
            overrides={name: value for name in _OVERRIDABLE
                       if (value := getattr(self, name)) is not None},
        )


class Stage1Config(TrainingStageConfig):
    training_args_path: str = Field(default="configs/train/stage1-cc100.json",
                                    description="HF TrainingArguments JSON (run_mlm style accepted)")


class Stage2Config(TrainingStageConfig):
    training_args_path: str = Field(default="configs/train/stage2-jawiki.json",
                                    description="HF TrainingArguments JSON (run_mlm style accepted)")


_MLM_EVAL = MlmEvalSettings()


class MlmEvalSetConfig(Config):
    """The fixed MLM evaluation set: which validation sentences, how long, how they are masked."""

    max_sequences: int = Field(default=_MLM_EVAL.max_sequences, description="sentences per corpus (seeded sample)")
    max_seq_length: int = Field(default=_MLM_EVAL.max_seq_length,
                                description="[CLS] + up to max_seq_length - 2 tokens + [SEP]; at most the "
                                            "models' max_position_embeddings")
    mlm_probability: float = _MLM_EVAL.mlm_probability
    seed: int = _MLM_EVAL.seed

    def to_settings(self) -> MlmEvalSettings:
        settings = MlmEvalSettings(**self.model_dump())
        settings.validate()
        return settings


class EvaluationConfig(Config):
    """One checkpoint's evaluation: the fixed MLM set, then JSTS and JCommonsenseQA fine-tuning."""

    jglue_settings_path: str = Field(default="configs/jglue/default.json",
                                     description="fine-tuning settings JSON (epochs, learning_rate, batch, "
                                                 "max_seq_length, seed, ...): the same for every model compared")
    mlm_batch_size: int = Field(default=64, description="sequences per batch when scoring the fixed MLM set")

    def jglue_settings(self) -> JglueSettings:
        from tinyplm_lib.evaluation.jglue import load_settings as load_jglue_settings

        return load_jglue_settings(resolve_path(self.jglue_settings_path, "jglue_settings_path"))
