import json

import pytest

from nirvana.config import CacheConfig, ConfigError, RequestDefaults, UNetLoopConfig, parse_parameters


def pbtxt_params(**values):
    return {"parameters": {k: {"string_value": v} for k, v in values.items()}}


def test_defaults_when_no_parameters():
    assert parse_parameters(CacheConfig, {}) == CacheConfig()


def test_parses_typed_values_and_thresholds_from_json_text():
    config = parse_parameters(CacheConfig, json.dumps(pbtxt_params(
        cache_steps="4,8", base_steps="20", thresholds="0.8:4, 0.9:8", exact_hit="false", host_bytes="1024")))
    assert config.cache_steps == (4, 8)
    assert config.base_steps == 20
    assert config.thresholds == ((0.9, 8), (0.8, 4))  # sorted, highest similarity first
    assert config.exact_hit is False
    assert config.host_bytes == 1024


@pytest.mark.parametrize("params, message", [
    ({"no_such_key": "1"}, "unknown parameter 'no_such_key'"),
    ({"base_steps": "fifty"}, "parameter 'base_steps'"),
    ({"thresholds": "0.9-25"}, "SIMILARITY:STEP"),
    ({"thresholds": "0.9:7"}, "not in cache_steps"),
    ({"eviction": "random"}, "eviction must be"),
    ({"exact_hit": "maybe"}, "parameter 'exact_hit'"),
])
def test_bad_parameters_are_named(params, message):
    with pytest.raises(ConfigError, match=message):
        parse_parameters(CacheConfig, pbtxt_params(**params))


def test_request_defaults_validated():
    with pytest.raises(ConfigError, match="default_steps"):
        parse_parameters(RequestDefaults, pbtxt_params(default_steps="300", max_steps="200"))


def test_unknown_scheduler_rejected():
    with pytest.raises(ConfigError, match="scheduler must be one of"):
        parse_parameters(UNetLoopConfig, pbtxt_params(scheduler="heun2"))


def test_committed_configs_parse(repository):
    """Every parameters block in model_repository parses into its dataclass."""
    from nirvana.config import OnnxModelConfig, read_pbtxt_parameters

    classes = {"tokenizer": RequestDefaults, "latent_cache": CacheConfig, "unet_loop": UNetLoopConfig,
               "text_encoder": OnnxModelConfig, "vae_decoder": OnnxModelConfig}
    for model, cls in classes.items():
        params = read_pbtxt_parameters(repository / model / "config.pbtxt")
        assert params["parameters"], model
        parse_parameters(cls, params)


def test_grafana_dashboard_queries_only_exported_metrics():
    """Every nirvana_* series the dashboard plots is one the latent_cache model exports."""
    import json
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    dashboard = json.loads((root / "deploy" / "grafana_dashboard.json").read_text())
    exported = set(re.findall(r'"(nirvana_[a-z_]+)"', (root / "python_backend" / "nirvana" / "metrics.py").read_text()))
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"nirvana_[a-z_]+", target["expr"])}
    assert used and used <= exported, used - exported
