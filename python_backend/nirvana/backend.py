"""Glue between Triton's Python backend and the pipeline steps.

The ``model.py`` adapters pass in ``triton_python_backend_utils`` (``pb_utils``),
so this package never imports Triton itself and its logic stays testable.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from nirvana.inputs import InvalidInput
from nirvana.cache.shared import SharedTierError
from nirvana.step_engine import EngineUnavailable, RequestCancelled

Outputs = Dict[str, np.ndarray]
# Key under which serve() hands a request's parameters to a step with WANTS_PARAMETERS.
PARAMETERS = "parameters"


def version_dir(args: Mapping[str, str]) -> Path:
    """The model's version folder, where the export put its artifacts."""
    return Path(args["model_repository"]) / str(args["model_version"])


def model_config(args: Mapping[str, str]) -> Dict[str, Any]:
    return json.loads(args["model_config"])


def read_inputs(pb_utils, request, names: Sequence[str]) -> Dict[str, Optional[np.ndarray]]:
    """The named inputs of ``request`` as numpy arrays (None where the client sent none)."""
    values: Dict[str, Optional[np.ndarray]] = {}
    for name in names:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        values[name] = None if tensor is None else tensor.as_numpy()
    return values


def request_parameters(request) -> Dict[str, Any]:
    """A request's parameters (forwarded headers included) as a dict."""
    try:
        return dict(json.loads(request.parameters() or "{}"))
    except (AttributeError, TypeError, ValueError):
        return {}


def error_response(pb_utils, exc: BaseException):
    """INVALID_ARG for bad input (the message names the field); UNAVAILABLE for a missing admin key
    (what Triton's own restricted protocols answer), for an overloaded, stopping or timed-out
    UNet loop and for an admin flush that could not reach the shared tier (the client may retry); CANCELLED for a cancelled request; INTERNAL otherwise."""
    codes = pb_utils.TritonError
    if isinstance(exc, InvalidInput):
        return pb_utils.InferenceResponse(error=codes(str(exc), codes.INVALID_ARG))
    if isinstance(exc, (PermissionError, EngineUnavailable, SharedTierError)):
        return pb_utils.InferenceResponse(error=codes(str(exc), codes.UNAVAILABLE))
    if isinstance(exc, RequestCancelled):
        return pb_utils.InferenceResponse(error=codes(str(exc), getattr(codes, "CANCELLED", codes.UNAVAILABLE)))
    return pb_utils.InferenceResponse(error=codes(f"{type(exc).__name__}: {exc}", codes.INTERNAL))


def serve(pb_utils, requests: List, step, logger=None) -> List:
    """Run ``step`` over a list of Triton requests and build one response per request.

    ``step`` has ``INPUTS`` (input names) and ``execute(list_of_input_dicts)`` returning,
    per request, either a dict of output arrays or the exception that request raised.
    A failure of the whole batch fails every request in it, and the model keeps serving.
    """
    batch = [read_inputs(pb_utils, r, step.INPUTS) for r in requests]
    if getattr(step, "WANTS_PARAMETERS", False):
        for inputs, request in zip(batch, requests):
            inputs[PARAMETERS] = request_parameters(request)
    try:
        results: List[Union[Outputs, BaseException]] = step.execute(batch)
    except Exception as exc:  # noqa: BLE001 - reported to every client of the batch
        if logger is not None and not isinstance(exc, (InvalidInput, PermissionError)):
            logger.log_error(traceback.format_exc())
        results = [exc] * len(requests)
    return [error_response(pb_utils, r) if isinstance(r, BaseException) else make_response(pb_utils, r)
            for r in results]


class TritonResponder:
    """Answers one request after ``execute`` returned, from any thread, exactly once.

    A non-decoupled Python model may keep a request's response sender, return None from
    ``execute`` and send the single response (with the FINAL flag) later; Triton ensembles, HTTP,
    unary gRPC and perf_analyzer see an ordinary response.
    """

    def __init__(self, pb_utils, request, logger=None):
        self._pb_utils = pb_utils
        self._sender = request.get_response_sender()
        self._logger = logger

    def send(self, outputs: Outputs) -> None:
        self._final(make_response(self._pb_utils, outputs))

    def fail(self, exc: BaseException) -> None:
        self._final(error_response(self._pb_utils, exc))

    def is_cancelled(self) -> bool:
        return bool(self._sender.is_cancelled())

    def _final(self, response) -> None:
        try:
            self._sender.send(response, flags=self._pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception:  # noqa: BLE001 - e.g. the server already dropped the request
            if self._logger is not None:
                self._logger.log_error(traceback.format_exc())


def serve_held(pb_utils, requests: List, step, logger=None) -> None:
    """Hand each request to ``step.submit(inputs, responder)``, which answers it later (or now).

    A request ``submit`` refuses (bad input, overload) is answered here at once, so every
    request gets exactly one response. Returns None, as Triton expects from such a model.
    """
    for request in requests:
        responder = TritonResponder(pb_utils, request, logger)
        try:
            step.submit(read_inputs(pb_utils, request, step.INPUTS), responder)
        except Exception as exc:  # noqa: BLE001 - answered with its Triton error code
            if logger is not None and not isinstance(exc, (InvalidInput, EngineUnavailable)):
                logger.log_error(traceback.format_exc())
            responder.fail(exc)
    return None


def make_response(pb_utils, outputs: Outputs):
    """An InferenceResponse holding ``outputs`` (name -> numpy array)."""
    tensors = [pb_utils.Tensor(name, value if value.dtype == object else np.ascontiguousarray(value))
               for name, value in outputs.items()]
    return pb_utils.InferenceResponse(output_tensors=tensors)



def device_for(args: Mapping[str, str]):
    """The torch device for this model instance: its GPU for a KIND_GPU instance, else GPU 0 when
    there is one (a KIND_CPU Python model may still keep tensors on a GPU), else the CPU."""
    import torch

    if not torch.cuda.is_available():
        return torch.device("cpu")
    if args.get("model_instance_kind") == "GPU":
        return torch.device("cuda", int(args.get("model_instance_device_id", 0)))
    return torch.device("cuda", 0)


def onnx_model_adapter(pb_utils):
    """The TritonPythonModel class of a model that runs its ``1/model.onnx`` with onnxruntime.

    text_encoder and vae_decoder use it on the CPU path (the NVIDIA container runs the same
    files on Triton's onnxruntime backend instead).
    """
    from nirvana.config import OnnxModelConfig, parse_parameters
    from nirvana.pipeline import OnnxStep

    class TritonPythonModel:
        def initialize(self, args):
            config = parse_parameters(OnnxModelConfig, model_config(args))
            self.step = OnnxStep(version_dir(args) / "model.onnx", config)

        def execute(self, requests):
            return serve(pb_utils, requests, self.step, pb_utils.Logger)

    return TritonPythonModel
