"""The exported artifacts: real MiniLM similarity, post-processing in the VAE graph, container repository."""

import numpy as np
import pytest
import torch

from nirvana.config import OnnxModelConfig, PipelineSpec
from nirvana.onnx_session import OnnxModel
from nirvana.pipeline import OnnxStep, TokenizerStep
from nirvana.config import RequestDefaults


@pytest.fixture(scope="module")
def encode(repository):
    tokenizer = TokenizerStep(repository / "tokenizer" / "1", RequestDefaults())
    encoder = OnnxStep(repository / "text_encoder" / "1" / "model.onnx", OnnxModelConfig())

    def run(prompts):
        batch = [{"PROMPT": np.array([[p.encode()]], dtype=object), "NEGATIVE_PROMPT": None, "SEED": None,
                  "STEPS": None, "GUIDANCE_SCALE": None} for p in prompts]
        tokens = tokenizer.execute(batch)
        out = encoder.execute([{"INPUT_IDS": t["INPUT_IDS"], "ATTENTION_MASK": t["ATTENTION_MASK"]} for t in tokens])
        return np.concatenate([o["POOLED_EMBEDDING"] for o in out]), out[0]["HIDDEN_STATES"].shape

    return run


def test_cache_key_is_the_real_minilm_sentence_embedding(encode):
    from sentence_transformers import SentenceTransformer

    from nirvana_export.embedded import minilm_path

    prompts = ["a photo of a cat on a sofa", "a photograph of a cat sitting on a couch", "a city skyline at night"]
    ours, hidden_shape = encode(prompts)
    reference = SentenceTransformer(str(minilm_path()), device="cpu").encode(prompts, normalize_embeddings=True)
    np.testing.assert_allclose(ours, reference, atol=1e-4)
    assert hidden_shape == (1, 77, 384)
    similar, unrelated = float(ours[0] @ ours[1]), float(ours[0] @ ours[2])
    assert similar > 0.8 and unrelated < 0.3


def test_vae_graph_outputs_uint8_images(repository):
    spec = PipelineSpec.load(repository / "vae_decoder" / "1")
    vae = OnnxModel(repository / "vae_decoder" / "1" / "model.onnx")
    image = vae.run({"LATENTS": np.random.default_rng(0).standard_normal((2, *spec.latent_shape), np.float32)})["IMAGE"]
    assert image.dtype == np.uint8
    assert image.shape == (2, spec.latent_height * spec.vae_scale_factor, spec.latent_width * spec.vae_scale_factor, 3)


def test_container_repository_uses_the_onnxruntime_backend(repository):
    container = repository.parent / "build" / "model_repository_container"
    for model in ("text_encoder", "vae_decoder"):
        config = (container / model / "config.pbtxt").read_text()
        assert 'backend: "onnxruntime"' in config
        assert (container / model / "1" / "model.onnx").exists()
        assert not (container / model / "1" / "model.py").exists()
    for model in ("tokenizer", "latent_cache", "unet_loop"):
        assert (container / model / "1" / "model.py").exists()
    assert (container / "txt2img" / "config.pbtxt").read_text() == (repository / "txt2img" / "config.pbtxt").read_text()


def test_iobinding_path_matches_plain_run(repository):
    import torch

    spec = PipelineSpec.load(repository / "unet_loop" / "1")
    unet = OnnxModel(repository / "unet_loop" / "1" / "unet.onnx", "cpu")
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((3, *spec.latent_shape), np.float32),
             "timestep": np.array([999.0, 500.0, 1.0], np.float32),
             "encoder_hidden_states": rng.standard_normal((3, spec.max_length, spec.hidden_dim), np.float32)}
    plain = unet.run(feeds)["noise_pred"]
    bound = unet.run_bound({k: torch.from_numpy(v) for k, v in feeds.items()},
                           output_shapes={"noise_pred": plain.shape})["noise_pred"]
    np.testing.assert_array_equal(bound.numpy(), plain)


def test_text_encoder_memo_answers_repeated_rows_with_the_same_outputs(repository):
    import dataclasses

    config = OnnxModelConfig(intra_op_threads=1)
    path = repository / "text_encoder" / "1" / "model.onnx"
    plain, memoized = OnnxStep(path, config), OnnxStep(path, dataclasses.replace(config, memo_rows=2))
    tokenizer = TokenizerStep(repository / "tokenizer" / "1", RequestDefaults())

    def tokens(*prompts):
        out = tokenizer.execute([{"PROMPT": np.array([[p.encode()] for p in prompts], dtype=object),
                                  "NEGATIVE_PROMPT": None, "SEED": None, "STEPS": None, "GUIDANCE_SCALE": None}])[0]
        return [{"INPUT_IDS": out["INPUT_IDS"], "ATTENTION_MASK": out["ATTENTION_MASK"]}]

    for batch in (tokens("a red fox", "a blue boat"), tokens("a blue boat", "a green tree"), tokens("a red fox")):
        want, got = plain.execute(batch)[0], memoized.execute(batch)[0]
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    # rows seen: fox, boat | boat (hit), tree | fox (evicted by the capacity of 2: recomputed)
    assert (memoized.memo.hits, memoized.memo.misses) == (1, 4)


def test_default_export_uses_the_committed_trained_weights_and_calibration(repository):
    from nirvana_export import embedded

    spec = PipelineSpec.load(repository / "unet_loop" / "1")
    assert spec.model_id == embedded.model_id(True)  # names the weights' content hash
    assert spec.thresholds == embedded.calibrated_thresholds()
    vae = embedded.build_vae(embedded.WEIGHTS_DIR / embedded.VAE_WEIGHTS)
    assert vae.config.scaling_factor != pytest.approx(0.18215)  # the trained latents' own scale
    decoder = OnnxModel(repository / "vae_decoder" / "1" / "model.onnx")
    latents = np.random.default_rng(0).standard_normal((1, *spec.latent_shape)).astype(np.float32)
    with torch.no_grad():
        expected = vae.decode(torch.from_numpy(latents) / vae.config.scaling_factor).sample
    expected = ((expected / 2 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1).numpy()
    image = decoder.run({"LATENTS": latents})["IMAGE"]
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 2  # the ONNX decoder holds these weights


def test_export_refuses_a_weights_folder_without_weights(repository, tmp_path, capsys):
    from nirvana_export import cli

    stamp = (repository / ".exported").read_text()
    assert cli.main(["--repository", str(repository), "--weights", str(tmp_path / "none")]) == 1
    assert "make train" in capsys.readouterr().err
    assert (repository / ".exported").read_text() == stamp  # refused before writing anything
