"""Triton adapter running the VAE decoder ONNX graph with onnxruntime (CPU path).

In the NVIDIA container the export swaps this model for Triton's onnxruntime backend.
"""

import triton_python_backend_utils as pb_utils

from nirvana import backend
from nirvana.config import OnnxModelConfig, parse_parameters
from nirvana.pipeline import OnnxStep


class TritonPythonModel:
    def initialize(self, args):
        config = parse_parameters(OnnxModelConfig, backend.model_config(args))
        self.step = OnnxStep(backend.version_dir(args) / "model.onnx", config)

    def execute(self, requests):
        return backend.serve(pb_utils, requests, self.step, pb_utils.Logger)
