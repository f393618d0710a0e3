import json

import pytest

from microbert.config import PRESETS, ModelConfig, get_preset
from microbert.errors import ConfigError


def test_presets_have_the_documented_shapes():
    shapes = {
        "imdb-small": (2, 2, 4),
        "hf-medium": (4, 4, 8),
        "hf-large": (6, 8, 16),
        "hf-xl": (8, 8, 256),
        "bert-tiny": (2, 2, 128),
        "bert-mini": (4, 4, 256),
        "bert-small": (4, 8, 512),
        "bert-medium": (8, 8, 512),
        "bert-base": (12, 12, 768),
    }
    assert set(PRESETS) == set(shapes)
    for name, (layers, heads, hidden) in shapes.items():
        c = get_preset(name)
        assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == (layers, heads, hidden)
    xl = get_preset("hf-xl")
    assert (xl.max_position_embeddings, xl.vocab_size) == (256, 25000)


def test_bert_base_parameter_count_matches_the_published_figure():
    # transformers' BertForMaskedLM(bert-base-uncased) has 109,514,298 parameters (tied decoder).
    assert get_preset("bert-base").num_parameters() == 109_514_298


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ConfigError) as err:
        get_preset("bert-huge")
    assert "bert-huge" in str(err.value) and "bert-base" in str(err.value) and "imdb-small" in str(err.value)


def test_validation_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        ModelConfig(hidden_size=100, num_attention_heads=3, hidden_act="swish", hidden_dropout_prob=1.5)
    problems = err.value.problems
    assert len(problems) == 3
    assert any("divisible" in p for p in problems)
    assert any("hidden_act" in p for p in problems)
    assert any("hidden_dropout_prob" in p for p in problems)


def test_json_round_trip(tmp_path):
    config = get_preset("bert-mini").replace(vocab_size=8000)
    config.to_json(tmp_path / "config.json")
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "bert" and data["architectures"] == ["BertForMaskedLM"]
    assert ModelConfig.from_json(tmp_path / "config.json") == config


def test_unknown_keys_are_rejected():
    with pytest.raises(ConfigError, match="hiden_size"):
        ModelConfig.from_dict({"hiden_size": 128})
    # Keys transformers writes pass when reading a Hugging Face config.json, others still fail.
    assert (
        ModelConfig.from_dict({"transformers_version": "5.0", "hidden_size": 768}, hf=True).hidden_size == 768
    )
    with pytest.raises(ConfigError, match="rotary"):
        ModelConfig.from_dict({"rotary": True}, hf=True)
    with pytest.raises(ConfigError, match="position_embedding_type"):
        ModelConfig.from_dict({"position_embedding_type": "relative_key"}, hf=True)


def test_invalid_json_file_is_a_clear_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json(path)
    with pytest.raises(ConfigError, match="does not exist"):
        ModelConfig.from_json(tmp_path / "missing.json")
