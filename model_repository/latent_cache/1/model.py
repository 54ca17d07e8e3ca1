"""Triton adapter for the latent cache (lookup before the UNet, admission after it, admin).

The cache lives in this model's process: keep instance count 1 so every
request sees the same cache.
"""

import triton_python_backend_utils as pb_utils

from nirvana import admin, backend
from nirvana.cache_step import CacheStep
from nirvana.config import CacheConfig, parse_parameters
from nirvana.metrics import CacheMetrics


class TritonPythonModel:
    def initialize(self, args):
        config = parse_parameters(CacheConfig, backend.model_config(args))
        self.step = CacheStep(backend.version_dir(args), config, backend.device_for(args),
                              admin_key=admin.server_key(), log=pb_utils.Logger.log_error)
        self.metrics = CacheMetrics(pb_utils)
        report = self.step.restore_report
        if report.get("problems"):
            pb_utils.Logger.log_warn(f"latent_cache restored with problems (each skipped): {report}")
        elif report.get("snapshot") or report.get("journal_records") or report.get("shared"):
            pb_utils.Logger.log_info(f"latent_cache restored {report}")

    def execute(self, requests):
        responses = backend.serve(pb_utils, requests, self.step, pb_utils.Logger)
        self.metrics.publish(self.step)
        return responses

    def finalize(self):
        # A clean shutdown writes a final snapshot of everything the journal holds.
        self.step.close()
