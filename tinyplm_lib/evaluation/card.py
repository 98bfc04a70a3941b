"""The model card: README.md of a model folder, with Hugging Face YAML front matter and a model-index.

`CardInfo` holds everything the card states, all measured by the pipeline (nothing is filled in
here); `model_card` renders it and `write_model_card` writes it into a model folder. A result that
was not measured (a stage not yet fine-tuned on JGLUE) is left out, never written as null.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import yaml

from tinyplm_lib.evaluation.jglue_data import JCOMMONSENSEQA, JSTS
from tinyplm_lib.files import atomic_write_text

MODEL_CARD_FILE = "README.md"


class JglueMetric(NamedTuple):
    """One JGLUE dev score as the card and the model-index name it."""

    label: str  # short, for tables and plots
    task: str  # the pipeline's task name (jglue_data.TASKS)
    score: str  # its key in the task's metrics.json
    config: str  # JGLUE's name of the task, also the config of the Hub dataset
    task_type: str  # Hub task id of the fine-tuned head
    metric_type: str  # Hub metric id
    metric_name: str


# The JGLUE scores the project reports, by the key used in score dicts (plots, CardInfo).
JGLUE_METRICS = {
    "jsts_pearson": JglueMetric("JSTS Pearson", JSTS, "pearson", "JSTS", "text-classification", "pearsonr",
                                "Pearson"),
    "jsts_spearman": JglueMetric("JSTS Spearman", JSTS, "spearman", "JSTS", "text-classification", "spearmanr",
                                 "Spearman"),
    "jcqa_accuracy": JglueMetric("JCQA accuracy", JCOMMONSENSEQA, "accuracy", "JCommonsenseQA", "multiple-choice",
                                 "accuracy", "Accuracy"),
}
JGLUE_TASK_NAMES = {"JSTS": "Semantic textual similarity (regression head)",
                    "JCommonsenseQA": "Commonsense multiple choice, 5 options"}
JGLUE_DATASET = "shunk031/JGLUE"  # the Hub copy of JGLUE; the scores are on the v1.3 dev files
# Published dev scores (JGLUE README, v1.3): the yardstick Japanese encoders are compared with.
REFERENCE_NAME = "Tohoku BERT base (published)"
REFERENCE_SCORES = {"jsts_pearson": 0.909, "jsts_spearman": 0.868, "jcqa_accuracy": 0.808}
JCQA_CHANCE = 0.2  # one of five choices
# The terms each known training source comes under, quoted in the card.
SOURCE_TERMS = {
    "cc100": "CC-100 is text extracted from Common Crawl; it comes under the Common Crawl terms of use "
             "(https://commoncrawl.org/terms-of-use).",
    "wikipedia": "Wikipedia text is licensed CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/).",
}


def jglue_scores(metrics: dict[str, dict]) -> dict[str, float]:
    """One model's scores keyed as JGLUE_METRICS, from its metrics.json by task ({"jsts": {...}, ...}).

    A task absent from `metrics` is left out, so a model not yet fine-tuned on it shows no score; so is
    a score that is undefined (None: a correlation of predictions that are all the same).
    """
    return {key: metrics[m.task][m.score] for key, m in JGLUE_METRICS.items()
            if metrics.get(m.task, {}).get(m.score) is not None}


@dataclass(frozen=True)
class CorpusInfo:
    """A pretraining corpus as the run used it."""

    key: str  # the pipeline's name for it, as the MLM evaluation set names it: "cc100", "jawiki"
    dataset: str  # Hub dataset id, for the front matter and model-index: "cc100", "wikipedia"
    name: str  # shown in the card: "CC-100 (ja)", "Japanese Wikipedia (CirrusSearch)"
    dump: str  # the dump or snapshot the text came from, e.g. "jawiki-20240701"
    lines: int  # training lines (sentences) after cleaning
    tokens: int  # WordPiece tokens of those lines


@dataclass(frozen=True)
class StageInfo:
    """One pretraining stage that led to these weights (from its metrics.json)."""

    name: str  # "stage1"
    corpus: str  # `key` of the CorpusInfo it trained on
    steps: int  # optimizer steps
    tokens_seen: int
    wall_time_s: float
    hardware: str  # e.g. "1 x NVIDIA H200, bf16" or "CPU (2 cores), fp32"
    max_seq_length: int
    mlm_probability: float  # share of tokens masked (80% [MASK], 10% random, 10% kept)


@dataclass(frozen=True)
class MlmResult:
    """Masked-token accuracy and loss on one corpus's fixed MLM evaluation set."""

    corpus: str  # `key` of the CorpusInfo whose validation sentences the set holds
    accuracy: float
    loss: float
    masked_tokens: int  # positions scored


@dataclass(frozen=True)
class CardInfo:
    """What the card of one model folder states. JGLUE dicts use the keys of JGLUE_METRICS."""

    model_name: str  # model-index name and title, e.g. "tinyplm-bert-13m-stage2"
    corpora: tuple[CorpusInfo, ...]  # every corpus the weights were trained on, in training order
    stages: tuple[StageInfo, ...]  # every stage that led to these weights, in order
    parameters: int
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    vocab_size: int
    tokenizer_sample_lines: int  # lines the WordPiece vocabulary was trained on
    mlm: tuple[MlmResult, ...] = ()
    jglue: dict[str, float] = field(default_factory=dict)  # this model's dev scores
    jglue_others: dict[str, dict[str, float]] = field(default_factory=dict)  # e.g. {"stage1": ...}
    jglue_control: dict[str, float] = field(default_factory=dict)  # random init, same shape and budget
    jglue_settings: dict = field(default_factory=dict)  # the fine-tuning budget, shown as given
    # False when the scores come from other files than JGLUE v1.3's own (the demo's set): then they
    # are shown as such and kept out of the model-index, which claims JGLUE dev scores.
    jglue_official: bool = True
    license: str = "apache-2.0"
    repo_id: str | None = None  # where users load it from; a local path placeholder when None
    tags: tuple[str, ...] = ("bert", "japanese", "masked-lm", "tinyplm")

    def validate(self) -> None:
        """A ValueError naming the field when a reference or a score is wrong."""
        known = {corpus.key for corpus in self.corpora}
        for where, corpus in [(f"stages[{i}].corpus", s.corpus) for i, s in enumerate(self.stages)] + [
                (f"mlm[{i}].corpus", r.corpus) for i, r in enumerate(self.mlm)]:
            if corpus not in known:
                raise ValueError(f"CardInfo.{where}: {corpus!r} is not one of corpora {sorted(known)}")
        for where, scores in [("jglue", self.jglue), ("jglue_control", self.jglue_control)] + [
                (f"jglue_others[{name!r}]", s) for name, s in self.jglue_others.items()]:
            for key, value in scores.items():
                if key not in JGLUE_METRICS:
                    raise ValueError(f"CardInfo.{where}: unknown metric {key!r}; expected {list(JGLUE_METRICS)}")
                _check_number(f"{where}[{key!r}]", value)
        for index, result in enumerate(self.mlm):
            _check_number(f"mlm[{index}].accuracy", result.accuracy)
            _check_number(f"mlm[{index}].loss", result.loss)

    def corpus(self, key: str) -> CorpusInfo:
        return next(c for c in self.corpora if c.key == key)


def _check_number(where: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"CardInfo.{where}: expected a finite number, got {value!r}")


def model_index(info: CardInfo) -> list[dict]:
    """The `model-index` entry of the front matter (hub-docs modelcard.md): measured results only."""
    results = []
    for result in info.mlm:
        corpus = info.corpus(result.corpus)
        results.append({
            "task": {"type": "fill-mask", "name": "Masked language modelling"},
            "dataset": {"type": corpus.dataset, "name": f"{corpus.name}, fixed MLM evaluation set",
                        "split": "validation"},
            # float(): numpy scalars are numbers too, but yaml.safe_dump refuses them.
            "metrics": [{"type": "accuracy", "value": float(result.accuracy), "name": "Masked-token accuracy"},
                        {"type": "loss", "value": float(result.loss), "name": "MLM loss"}],
        })
    for config in dict.fromkeys(metric.config for metric in JGLUE_METRICS.values()):
        keys = [key for key, metric in JGLUE_METRICS.items()
                if metric.config == config and key in info.jglue and info.jglue_official]
        if not keys:
            continue
        results.append({
            "task": {"type": JGLUE_METRICS[keys[0]].task_type, "name": JGLUE_TASK_NAMES[config]},
            "dataset": {"type": JGLUE_DATASET, "name": f"JGLUE v1.3 {config}", "config": config,
                        "split": "validation"},
            "metrics": [{"type": JGLUE_METRICS[key].metric_type, "value": float(info.jglue[key]),
                         "name": f"Dev {JGLUE_METRICS[key].metric_name}"} for key in keys],
        })
    return [{"name": info.model_name, "results": results}]


def front_matter(info: CardInfo) -> dict:
    """The card's YAML metadata as a dict (model-index left out when nothing was measured)."""
    metadata = {
        "language": ["ja"], "license": info.license, "library_name": "transformers", "pipeline_tag": "fill-mask",
        "tags": list(info.tags), "datasets": list(dict.fromkeys(corpus.dataset for corpus in info.corpora)),
    }
    index = model_index(info)
    if index[0]["results"]:
        metadata["model-index"] = index
    return metadata


def _training_section(info: CardInfo) -> list[str]:
    lines = ["## Training data", "", "| corpus | Hub dataset | dump | training lines | tokens |",
             "|---|---|---|---:|---:|"]
    lines += [f"| {c.name} | `{c.dataset}` | {c.dump} | {c.lines:,} | {c.tokens:,} |" for c in info.corpora]
    lines += ["", "## Training", "",
              (f"`BertForMaskedLM`, {info.parameters:,} parameters: {info.num_hidden_layers} layers, hidden size "
              f"{info.hidden_size}, {info.num_attention_heads} attention heads, trained from scratch by masked "
              "language modelling (masked tokens: 80% `[MASK]`, 10% random, 10% kept), each stage continuing "
              "from the previous one."), "",
              "| stage | corpus | steps | tokens seen | sequence length | masked | wall time | hardware |",
              "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {s.name} | {info.corpus(s.corpus).name} | {s.steps:,} | {s.tokens_seen:,} | {s.max_seq_length} "
              f"| {s.mlm_probability:.0%} | {_duration(s.wall_time_s)} | {s.hardware} |" for s in info.stages]
    return lines


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _tokenizer_section(info: CardInfo) -> list[str]:
    return ["## Tokenizer", "",
            (f"`BertJapaneseTokenizer`: NFKC, words from MeCab (fugashi with the unidic-lite dictionary), then "
            f"WordPiece with a `##` continuation prefix; no lowercasing. {info.vocab_size:,} tokens: `[PAD]` "
            f"`[UNK]` `[CLS]` `[SEP]` `[MASK]` and `[unused0]`..`[unused9]` first, the WordPiece vocabulary "
            f"trained on {info.tokenizer_sample_lines:,} sampled lines after them.")]


def _usage_section(info: CardInfo) -> list[str]:
    where = info.repo_id or "path/to/this/folder"
    return ["## How to use", "",
            ("The tokenizer runs MeCab, so `fugashi` and `unidic-lite` are needed besides transformers "
            "(4.40 or later, or 5.x) and torch:"), "",
            "```bash", "pip install transformers torch fugashi unidic-lite", "```", "",
            "```python", "from transformers import AutoModelForMaskedLM, AutoTokenizer, pipeline", "",
            f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
            f'model = AutoModelForMaskedLM.from_pretrained("{where}")',
            'fill_mask = pipeline("fill-mask", model=model, tokenizer=tokenizer)',
            'print(fill_mask("日本の首都は[MASK]です。"))', "```"]


def _score(scores: dict[str, float], key: str) -> str:
    return f"{scores[key]:.3f}" if key in scores else "–"


def _scores_section(info: CardInfo) -> list[str]:
    lines = ["## Evaluation", ""]
    if info.mlm:
        lines += [("Masked-token accuracy and loss on fixed evaluation sets: validation sentences one per "
                  "sequence, masks drawn once from a seed, so every checkpoint is scored on the same positions."),
                  "", "| evaluation set | masked tokens | accuracy | loss |", "|---|---:|---:|---:|"]
        lines += [f"| {info.corpus(r.corpus).name} | {r.masked_tokens:,} | {r.accuracy:.4f} | {r.loss:.4f} |"
                  for r in info.mlm]
        lines.append("")
    rows = [(f"**{info.model_name}**", info.jglue), *info.jglue_others.items(),
            ("control: same architecture, random init, same budget", info.jglue_control)]
    rows = [(name, scores) for name, scores in rows if scores]
    if not rows:
        return lines + ["No JGLUE results yet."]
    if not info.jglue_official:
        lines += [("**Not JGLUE's dev split**: these scores come from other JSTS/JCommonsenseQA-format files "
                   "(e.g. the demo's own tiny set), so they say nothing about JGLUE and are not in the model-index."),
                  ""]
    lines += [(("JGLUE v1.3 dev" if info.jglue_official else "Dev") + " scores after fine-tuning with the standard heads "
              "(`AutoModelForSequenceClassification` regression for JSTS, `AutoModelForMultipleChoice` for "
              "JCommonsenseQA). The published base-size score is the yardstick, not a like-for-like comparison."), "",
              "| model | " + " | ".join(m.label for m in JGLUE_METRICS.values()) + " |",
              "|---|" + "---:|" * len(JGLUE_METRICS)]
    rows += [(REFERENCE_NAME, REFERENCE_SCORES), ("chance", {"jcqa_accuracy": JCQA_CHANCE})]
    lines += [f"| {name} | " + " | ".join(_score(scores, key) for key in JGLUE_METRICS) + " |" for name, scores in rows]
    if info.jglue_settings:
        settings = ", ".join(f"{key}={value}" for key, value in info.jglue_settings.items())
        lines += ["", f"Fine-tuning budget (the same for every model in the table): {settings}."]
    return lines


def _limitations_section(info: CardInfo) -> list[str]:
    steps = sum(stage.steps for stage in info.stages)
    terms = [SOURCE_TERMS[d] for d in dict.fromkeys(c.dataset for c in info.corpora) if d in SOURCE_TERMS]
    limits = [(f"- A small model ({info.parameters:,} parameters) after {steps:,} optimizer steps in all: expect "
              "scores far below base-size Japanese encoders; it is meant for experiments and pipeline checks."),
              "- The training text carries the biases and errors of its sources ("
              + ", ".join(c.name for c in info.corpora) + "); it was cleaned and deduplicated, not filtered "
              "for offensive content or personal information.",
              (f"- Inputs longer than {max(s.max_seq_length for s in info.stages)} tokens were never seen in "
              "training.")]
    if info.mlm:
        limits.append("- The MLM evaluation sets are held-out sentences of the training corpora: in-domain text.")
    if info.jglue or info.jglue_control or info.jglue_others:
        limits.append("- JGLUE scores come from one fine-tuning run per model: small differences are noise.")
    return ["## Limitations", "", *limits, "", "## Licence", "",
            f"The weights are released under `{info.license}`. The training text keeps its own terms:",
            "", *[f"- {term}" for term in terms],
            ("- JGLUE (evaluation only, CC BY-SA 4.0, © Yahoo Japan Corporation): Kurihara, Kawahara and "
            "Shibata, \"JGLUE: Japanese General Language Understanding Evaluation\", LREC 2022.")]


def model_card(info: CardInfo) -> str:
    """README.md text: YAML front matter, then training data, tokenizer, usage, scores, limitations."""
    info.validate()
    metadata = yaml.safe_dump(front_matter(info), sort_keys=False, allow_unicode=True, width=1000)
    body = [f"# {info.model_name}", "",
            f"A small Japanese BERT ({info.parameters:,} parameters) pre-trained from scratch by tinyplm on "
            + " then ".join(c.name for c in info.corpora) + ".", ""]
    for section in (_training_section, _tokenizer_section, _usage_section, _scores_section, _limitations_section):
        body += section(info) + [""]
    return "---\n" + metadata + "---\n\n" + "\n".join(body).rstrip("\n") + "\n"


def write_model_card(model_dir: Path, info: CardInfo) -> Path:
    """Write `model_card(info)` as README.md in `model_dir` (atomically, mode 0644); returns its path."""
    path = Path(model_dir) / MODEL_CARD_FILE
    atomic_write_text(path, model_card(info))
    path.chmod(0o644)
    return path
