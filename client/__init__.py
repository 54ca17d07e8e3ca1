"""Client library for the txt2img ensemble over tritonclient gRPC or HTTP."""

from nirvana_client.client import GenerationResult, Txt2ImgClient, Txt2ImgError

__all__ = ["GenerationResult", "Txt2ImgClient", "Txt2ImgError"]
