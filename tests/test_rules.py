"""Per-weight rules: ``Rule`` matches the whole path, the older ``(regex, config)`` pair anywhere in it."""

from __future__ import annotations

import pytest

from gptq_jax import QuantConfig
from gptq_jax.engine.rules import Rule, compile_rules, config_for, describe

Q4, Q8 = QuantConfig(bits=4), QuantConfig(bits=8, group_size=-1)


def test_a_rule_matches_the_whole_path_and_the_first_match_wins():
    rules = compile_rules([Rule(r".*\.mlp\.down_proj\.kernel", Q8), Rule(r"lm_head\..*", None), Rule(r".*", Q4)])
    assert config_for(rules, "layers.0.mlp.down_proj.kernel") == Q8
    assert config_for(rules, "layers.0.mlp.down_proj_2.kernel") == Q4  # re.search would have said Q8
    assert config_for(rules, "lm_head.kernel") is None
    assert config_for(rules, "layers.0.self_attn.q_proj.kernel") == Q4
    assert config_for(compile_rules([Rule(r"layers\.0\..*", Q4)]), "layers.1.q.kernel") is None  # no match: float


def test_the_older_pairs_keep_matching_anywhere():
    rules = compile_rules([(r"mlp\.down", Q8), (r"\.o\.w$", None), (".*", Q4)])
    assert config_for(rules, "layers.0.mlp.down_proj.kernel") == Q8
    assert config_for(rules, "blocks.1.o.w") is None
    assert config_for(rules, "blocks.1.o.w2") == Q4
    assert describe([(r"mlp\.down", Q8), Rule(".*", None)])[0][0] == r"mlp\.down"
    assert compile_rules(Q4) == [Rule(".*", Q4)]


def test_bad_rules_are_named():
    with pytest.raises(ValueError, match=r"Rule pattern 'layers\.\(' is not a valid regular expression"):
        Rule(r"layers.(", Q4)
    with pytest.raises(ValueError, match=r"quant_config\[1\]: '\[' is not a valid regular expression"):
        compile_rules([(".*", Q4), ("[", Q4)])
    with pytest.raises(TypeError, match="neither a QuantConfig nor None"):
        Rule(".*", 4)
    with pytest.raises(TypeError, match=r"quant_config\[0\] must be a Rule or a \(regex"):
        compile_rules([".*"])
    with pytest.raises(TypeError, match="quant_config must be a QuantConfig or a list of Rule"):
        compile_rules("bits=4")
