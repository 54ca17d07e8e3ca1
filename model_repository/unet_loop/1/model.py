"""Triton adapter for the step-range UNet loop.

With ``batching`` "step" (default) requests join a running batch and are answered from the step
engine's thread when their own steps are done (``execute`` returns None); with "execute" each
Triton batch runs to its end inside ``execute``.
"""

import triton_python_backend_utils as pb_utils

from nirvana import backend
from nirvana.config import UNetLoopConfig, parse_parameters
from nirvana.metrics import StepEngineMetrics
from nirvana.pipeline import UNetLoopStep


class TritonPythonModel:
    def initialize(self, args):
        config = parse_parameters(UNetLoopConfig, backend.model_config(args))
        metrics = StepEngineMetrics(pb_utils) if config.batching == "step" else None
        self.step = UNetLoopStep(backend.version_dir(args), config,
                                 on_engine_tick=metrics.publish if metrics else None,
                                 log_error=pb_utils.Logger.log_error)
        if not self.step.resumes_from_cache:
            pb_utils.Logger.log_warn(f"unet_loop: scheduler {config.scheduler!r} keeps a solver history that the "
                                     f"cache does not carry; approximate caching is off (no intermediate states "
                                     f"are admitted, resuming from one is refused), exact hits still work")

    def execute(self, requests):
        if self.step.engine is None:
            return backend.serve(pb_utils, requests, self.step, pb_utils.Logger)
        return backend.serve_held(pb_utils, requests, self.step, pb_utils.Logger)

    def finalize(self):
        failed = self.step.stop()
        if failed:
            pb_utils.Logger.log_warn(f"unet_loop: {failed} held requests failed at shutdown")
