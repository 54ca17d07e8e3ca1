"""Export diffusion models to ONNX and write a ready Triton model repository."""
