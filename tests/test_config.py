import json
import shutil
from pathlib import Path

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
    ({"redis_url": "localhost:6379"}, "redis_url must start with redis://"),
    ({"redis_url": "redis://r:6379/0", "snapshot_path": "/data"}, "redis_url and snapshot_path are exclusive"),
    ({"shared_timeout_ms": "0"}, "shared_timeout_ms must be >= 1"),
    ({"shared_prefix": ":"}, "shared_prefix must not be empty"),
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


ROOT = Path(__file__).resolve().parents[1]
COMMITTED_CONFIGS = sorted([*(ROOT / "model_repository").glob("*/config.pbtxt"),
                            *(ROOT / "export" / "container").glob("*/config.pbtxt")])


def model_config(path):
    """``path`` parsed by protobuf directly: the reference read_pbtxt_parameters must agree with."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(Path(path).read_text(), model_config_pb2.ModelConfig())


@pytest.mark.parametrize("path", COMMITTED_CONFIGS, ids=lambda p: f"{p.parent.parent.name}/{p.parent.name}")
def test_read_pbtxt_parameters_matches_the_protobuf_in_any_layout(path, tmp_path):
    """Every committed config reads as Triton parses it, also when rewritten in protobuf's own
    layout (``parameters { key: .. value { .. } }``, no colons), which a regex over our layout missed."""
    from google.protobuf import text_format

    from nirvana.config import read_pbtxt_parameters

    config = model_config(path)
    expected = {"parameters": {k: {"string_value": v.string_value} for k, v in config.parameters.items()}}
    assert read_pbtxt_parameters(path) == expected
    rewritten = tmp_path / "config.pbtxt"
    rewritten.write_text(text_format.MessageToString(config))
    assert read_pbtxt_parameters(rewritten) == expected


def test_read_pbtxt_parameters_rejects_an_invalid_config_naming_the_file(tmp_path):
    from nirvana.config import read_pbtxt_parameters

    path = tmp_path / "config.pbtxt"
    path.write_text('name: "m"\nparameters [ { key: "a" value: { string_value: "1" } }\n')  # unclosed list
    with pytest.raises(ConfigError, match=str(path)):
        read_pbtxt_parameters(path)


@pytest.fixture
def small_repository(tmp_path):
    """The committed configs, each with a stand-in model.py: a source for repository_variant."""
    source = tmp_path / "source"
    for config in (ROOT / "model_repository").glob("*/config.pbtxt"):
        model = source / config.parent.name
        (model / "1").mkdir(parents=True)
        shutil.copy2(config, model / "config.pbtxt")
        (model / "1" / "model.py").write_text(f"# {model.name}\n")
    (source / "latent_cache" / "1" / "__pycache__").mkdir()
    (source / "latent_cache" / "1" / "__pycache__" / "model.pyc").write_bytes(b"stale")
    return source


def test_repository_variant_replaces_and_adds_parameters_and_copies_the_rest_untouched(small_repository, tmp_path):
    from nirvana.config import read_pbtxt_parameters
    from nirvana_export.repository import repository_variant

    odd_path = str(tmp_path / 'snap "quoted" \\ dir')  # quotes and backslashes survive the round trip
    variant = repository_variant(small_repository, tmp_path / "variant", {
        "latent_cache": {"index": "flat", "snapshot_path": odd_path},
        "txt2img": {"note": "no parameters block before"}})
    assert variant == tmp_path / "variant"

    before, after = (read_pbtxt_parameters(r / "latent_cache" / "config.pbtxt")["parameters"]
                     for r in (small_repository, variant))
    assert after == {**before, "index": {"string_value": "flat"}, "snapshot_path": {"string_value": odd_path}}
    assert parse_parameters(CacheConfig, {"parameters": after}).index == "flat"
    assert read_pbtxt_parameters(variant / "txt2img" / "config.pbtxt")["parameters"] == {
        "note": {"string_value": "no parameters block before"}}

    for model in ("latent_cache", "txt2img"):  # the rest of an edited config is the same protobuf
        source, edited = model_config(small_repository / model / "config.pbtxt"), model_config(
            variant / model / "config.pbtxt")
        source.ClearField("parameters")
        edited.ClearField("parameters")
        assert edited == source, model
    for path in small_repository.rglob("*"):
        rel = path.relative_to(small_repository)
        if path.is_file() and "__pycache__" not in rel.parts and rel.parts[0] not in ("latent_cache", "txt2img"):
            assert (variant / rel).read_bytes() == path.read_bytes(), rel  # comments and all
    assert (variant / "latent_cache" / "1" / "model.py").exists()
    assert not (variant / "latent_cache" / "1" / "__pycache__").exists()
    assert read_pbtxt_parameters(small_repository / "latent_cache" / "config.pbtxt")["parameters"] == before


def test_repository_variant_refuses_an_unknown_model_before_writing(small_repository, tmp_path):
    from nirvana_export.repository import repository_variant

    with pytest.raises(FileNotFoundError, match="'latent_cahce'.*latent_cache"):
        repository_variant(small_repository, tmp_path / "variant", {"latent_cache": {"index": "flat"},
                                                                    "latent_cahce": {"index": "flat"}})
    assert not (tmp_path / "variant").exists()
    (small_repository / "unet_loop" / "config.pbtxt").unlink()
    with pytest.raises(FileNotFoundError, match="unet_loop"):
        repository_variant(small_repository, tmp_path / "variant", {"unet_loop": {"batching": "execute"}})
    assert not (tmp_path / "variant").exists()


def test_the_container_repository_persists_the_cache_in_the_mounted_checkout(repository, tmp_path):
    from nirvana.config import read_pbtxt_parameters
    from nirvana_export.repository import CONTAINER_CACHE_DIR, write_container_repository

    target = write_container_repository(repository, tmp_path / "container")
    params = read_pbtxt_parameters(target / "latent_cache" / "config.pbtxt")["parameters"]
    assert params["snapshot_path"]["string_value"] == CONTAINER_CACHE_DIR
    # The source's config (hard-linked into the copy) is left alone.
    assert read_pbtxt_parameters(repository / "latent_cache" / "config.pbtxt")["parameters"].get(
        "snapshot_path", {"string_value": ""})["string_value"] == ""
