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
