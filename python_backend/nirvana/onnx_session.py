"""One small class that runs an ONNX graph with onnxruntime.

On a GPU (onnxruntime-gpu in the NVIDIA container) tensors are bound in place
through IOBinding so latents stay on the device between steps; on the CPU the
same code path binds host memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np
import onnxruntime as ort
import torch

_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64,
                   torch.int32: np.int32, torch.uint8: np.uint8, torch.bool: np.bool_}


def select_providers(preference: str = "auto") -> List[str]:
    """onnxruntime execution providers for ``preference`` (auto, cpu, cuda, tensorrt).

    "auto" takes CUDA when onnxruntime has it and a GPU is visible, else the CPU.
    Asking for a provider that is not available raises instead of silently
    running somewhere slower.
    """
    available = ort.get_available_providers()
    gpu_visible = torch.cuda.is_available()
    if preference == "cpu":
        return ["CPUExecutionProvider"]
    if preference == "auto":
        if gpu_visible and "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]
    wanted = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}[preference]
    if wanted not in available or not gpu_visible:
        raise RuntimeError(f"execution_provider={preference!r} requested but onnxruntime offers "
                           f"{available} and a GPU is {'visible' if gpu_visible else 'not visible'}")
    chain = [wanted]
    if wanted == "TensorrtExecutionProvider":
        chain.append("CUDAExecutionProvider")
    return chain + ["CPUExecutionProvider"]


class OnnxModel:
    """An onnxruntime session with named inputs and outputs.

    Args:
        path: The .onnx file.
        execution_provider: auto, cpu, cuda or tensorrt (see :func:`select_providers`).
        intra_op_threads: onnxruntime intra-op threads; 0 lets onnxruntime decide.
    """

    def __init__(self, path: Path, execution_provider: str = "auto", intra_op_threads: int = 0):
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run the export first (make export)")
        options = ort.SessionOptions()
        if intra_op_threads:
            options.intra_op_num_threads = intra_op_threads
        self.providers = select_providers(execution_provider)
        self.session = ort.InferenceSession(str(path), sess_options=options, providers=self.providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.device = torch.device("cuda") if self.providers[0] != "CPUExecutionProvider" else torch.device("cpu")

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run on numpy arrays and return numpy arrays by output name."""
        outputs = self.session.run(self.output_names, {k: feeds[k] for k in self.input_names})
        return dict(zip(self.output_names, outputs))

    def run_bound(self, feeds: Mapping[str, torch.Tensor],
                  output_shapes: Optional[Mapping[str, Sequence[int]]] = None,
                  output_dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
        """Run on torch tensors through IOBinding, without copies.

        Inputs are bound where they live (host or device memory). Outputs whose
        shape is given are written straight into fresh torch tensors on the
        session's device; the others are copied out by onnxruntime.
        """
        binding = self.session.io_binding()
        keep_alive = []
        for name in self.input_names:
            tensor = feeds[name].contiguous()
            keep_alive.append(tensor)
            binding.bind_input(name, device_type=tensor.device.type, device_id=tensor.device.index or 0,
                               element_type=_TORCH_TO_NUMPY[tensor.dtype], shape=tuple(tensor.shape),
                               buffer_ptr=tensor.data_ptr())
        results: Dict[str, torch.Tensor] = {}
        for name in self.output_names:
            if output_shapes and name in output_shapes:
                out = torch.empty(tuple(output_shapes[name]), dtype=output_dtype, device=self.device)
                binding.bind_output(name, device_type=out.device.type, device_id=out.device.index or 0,
                                    element_type=_TORCH_TO_NUMPY[out.dtype], shape=tuple(out.shape),
                                    buffer_ptr=out.data_ptr())
                results[name] = out
            else:
                binding.bind_output(name, device_type=self.device.type)
        self.session.run_with_iobinding(binding)
        if len(results) < len(self.output_names):
            copied = binding.copy_outputs_to_cpu()
            for name, value in zip(self.output_names, copied):
                results.setdefault(name, torch.from_numpy(value))
        return results
