"""A real tritonserver (the 2.51 binary from nvidia-pytriton) over the exported repository."""

import pytest

from nirvana.tritonserver import TritonServer


@pytest.fixture(scope="session")
def server(repository):
    with TritonServer(repository) as running:
        yield running


@pytest.fixture(params=["grpc", "http"])
def client(request, server):
    from nirvana_client import Txt2ImgClient

    url = server.grpc_url if request.param == "grpc" else server.http_url
    with Txt2ImgClient(url, request.param, timeout_s=120) as c:
        yield c


@pytest.fixture(scope="session")
def served_start_step(repository):
    """(similarity, steps) -> the step the served cache resumes from, by the exported model's thresholds."""
    from nirvana.config import CacheConfig, PipelineSpec, parse_parameters, read_pbtxt_parameters
    from nirvana.steps import start_step_for

    spec = PipelineSpec.load(repository / "unet_loop" / "1")
    config = parse_parameters(CacheConfig, read_pbtxt_parameters(repository / "latent_cache" / "config.pbtxt"))
    config = config.with_model_thresholds(spec)
    return lambda similarity, steps: start_step_for(similarity, config.thresholds, config.base_steps, steps)
