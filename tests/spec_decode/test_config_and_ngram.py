"""speculative_config validation and the n-gram prompt-lookup proposer."""

from __future__ import annotations

import argparse

import pytest

from ember.config import ConfigError
from ember.engine.arg_utils import EngineArgs
from ember.spec_decode.config import SpeculativeConfig
from ember.spec_decode.ngram import NgramProposer


@pytest.mark.parametrize("value, setting", [
    ({"method": "eagle3", "num_speculative_tokens": 3}, "speculative_config.model must name the head"),
    ({"method": "draft_model"}, "speculative_config.model must name the draft model"),
    ({"method": "draft_model", "model": ""}, "speculative_config.model must name the draft model"),
    ({"method": "mtp", "model": "some/draft"}, "speculative_config.model is only read by methods"),
    ({"method": "lookahead"}, "speculative_config.method must be one of"),
    ({"method": "ngram", "model": "some/draft"}, "speculative_config.model is only read by methods"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 17}, "num_speculative_tokens"),
    ({"num_speculative_tokens": 2.5}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 0}, "prompt_lookup_min"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_max"),
    ({"disable_by_batch_size": 0}, "disable_by_batch_size"),
    ({"num_tokens": 3}, "unknown setting"),
    ("not json", "not JSON"),
    ([1, 2], "must be a dict"),
])
def test_bad_config_names_the_setting(value, setting):
    with pytest.raises(ConfigError, match=setting.replace("(", r"\(")):
        SpeculativeConfig.from_dict(value)


def test_defaults_and_lookup_max_only():
    cfg = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 1})
    assert (cfg.num_speculative_tokens, cfg.prompt_lookup_min, cfg.prompt_lookup_max) == (5, 1, 1)
    assert SpeculativeConfig.from_dict(None) is None


def test_engine_args_reject_before_loading_anything(smollm2_path, no_load):
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        EngineArgs(model=smollm2_path, speculative_config={"num_speculative_tokens": 99}).create_engine_config()
    cfg = EngineArgs(model=smollm2_path, speculative_config={"num_speculative_tokens": 2}).create_engine_config()
    assert cfg.speculative_config.num_speculative_tokens == 2


def test_cli_flag():
    parser = EngineArgs.add_cli_args(argparse.ArgumentParser())
    args = parser.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 4}'])
    assert EngineArgs.from_cli_args(args).speculative_config == {"method": "ngram", "num_speculative_tokens": 4}
    with pytest.raises(SystemExit):
        parser.parse_args(["--speculative-config", "[1]"])


def test_ngram_proposals():
    p = NgramProposer(k=3, min_n=2, max_n=4)
    assert p.propose([1, 2, 3, 4, 5, 1, 2, 3]) == [4, 5, 1]  # the 3-gram 1 2 3 recurs
    assert p.propose([1, 2, 3]) == []
    assert p.propose([5, 6, 7, 8, 5, 6]) == [7, 8, 5]
    assert p.propose([1, 2, 1, 2]) == [1, 2]  # stops at the sequence end
    assert p.propose([9, 1, 2, 7, 1, 2, 8, 1, 2]) == [8, 1, 2]  # the latest match wins
    # The longest n-gram wins over a later shorter match.
    assert p.propose([4, 1, 2, 5, 0, 1, 2, 6, 4, 1, 2]) == [5, 0, 1]
    assert p.propose([1, 2, 3, 1, 2], k=1) == [3]
    assert NgramProposer(k=2, min_n=1, max_n=1).propose([7, 3, 7]) == [3, 7]
