"""NIRVANA approximate caching for text-to-image diffusion, as a library.

Everything the Triton models do lives here, importable and testable without
Triton: request validation, tokenization, ONNX execution, the step-range
denoising loop and the latent cache. The ``model_repository/*/1/model.py``
files are thin adapters over these modules.
"""

__version__ = "0.1.0"
