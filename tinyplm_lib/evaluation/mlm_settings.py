"""The fixed MLM evaluation set's settings (`tinyplm_lib.evaluation.mlm` builds the set from them).

Apart from the builder, which needs torch, so the Dagster run config takes its defaults from here
without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from tinyplm_lib.errors import ConfigError


@dataclass(frozen=True)
class MlmEvalSettings:
    """Which sentences, how long, how they are masked; any change gives a different set."""

    max_sequences: int = 2000  # per corpus
    max_seq_length: int = 128  # [CLS] + up to max_seq_length - 2 tokens + [SEP]
    mlm_probability: float = 0.15
    seed: int = 42

    def validate(self) -> None:
        if not isinstance(self.max_sequences, int) or self.max_sequences < 1:
            raise ConfigError("max_sequences", f"must be an integer >= 1, got {self.max_sequences!r}")
        if not isinstance(self.max_seq_length, int) or not 3 <= self.max_seq_length <= 65535:
            raise ConfigError("max_seq_length", f"must be an integer in [3, 65535], got {self.max_seq_length!r}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError("mlm_probability", f"must lie in (0, 1), got {self.mlm_probability!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError("seed", f"must be an integer >= 0, got {self.seed!r}")
