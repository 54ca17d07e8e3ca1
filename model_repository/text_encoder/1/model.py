"""Triton adapter running the text encoder ONNX graph with onnxruntime (CPU path).

In the NVIDIA container the export swaps this model for Triton's onnxruntime backend.
"""

import triton_python_backend_utils as pb_utils

from nirvana import backend

TritonPythonModel = backend.onnx_model_adapter(pb_utils)
