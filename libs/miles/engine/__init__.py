"""Inference engines behind one seam (SGLang-shaped)."""

from miles.engine.protocol import Engine, GenerateOutput, GenerateRequest, SamplingParams

__all__ = ["Engine", "GenerateOutput", "GenerateRequest", "SamplingParams"]
