"""Inference engines behind one async seam, ``EngineClient`` (SGLang-shaped)."""

from miles.engine.protocol import EngineClient, GenerateOutput, GenerateRequest, SamplingParams

__all__ = ["EngineClient", "GenerateOutput", "GenerateRequest", "SamplingParams"]
