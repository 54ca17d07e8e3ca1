"""Triton adapter for the pipeline's entry: validation, defaults and tokenization."""

import triton_python_backend_utils as pb_utils

from nirvana import backend
from nirvana.config import RequestDefaults, parse_parameters
from nirvana.pipeline import TokenizerStep


class TritonPythonModel:
    def initialize(self, args):
        config = parse_parameters(RequestDefaults, backend.model_config(args))
        self.step = TokenizerStep(backend.version_dir(args), config)

    def execute(self, requests):
        return backend.serve(pb_utils, requests, self.step, pb_utils.Logger)
