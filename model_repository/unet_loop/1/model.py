"""Triton adapter for the step-range UNet loop (dynamic batching across requests)."""

import triton_python_backend_utils as pb_utils

from nirvana import backend
from nirvana.config import UNetLoopConfig, parse_parameters
from nirvana.pipeline import UNetLoopStep


class TritonPythonModel:
    def initialize(self, args):
        config = parse_parameters(UNetLoopConfig, backend.model_config(args))
        self.step = UNetLoopStep(backend.version_dir(args), config)

    def execute(self, requests):
        return backend.serve(pb_utils, requests, self.step, pb_utils.Logger)
