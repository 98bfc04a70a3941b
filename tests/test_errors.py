"""Error types keep their message and fields across a process boundary (worker pools pickle them)."""

from __future__ import annotations

import pickle

from tinyplm_lib.errors import ConfigError, InputError


def test_input_and_config_errors_survive_pickling():
    error = pickle.loads(pickle.dumps(InputError("dump.json.gz", "malformed JSON", line=17)))
    assert (str(error), error.path, error.line) == ("dump.json.gz, line 17: malformed JSON", "dump.json.gz", 17)
    config = pickle.loads(pickle.dumps(ConfigError("max_lines", "must be positive")))
    assert (str(config), config.setting) == ("setting 'max_lines': must be positive", "max_lines")
