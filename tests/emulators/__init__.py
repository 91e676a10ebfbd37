"""Loopback HTTP emulators of the image gateways, for tests and benchmarks.

with NanoGptEmulator(api_key="k") as emu:
    emu.inject(Fault.http(503, retry_after=1))
    ... httpx2.post(f"{emu.base_url}/images/generations", ...) ...
    emu.requests[-1].json
"""

from __future__ import annotations

from .ai_nebula import AiNebulaEmulator
from .base import (
    DEFAULT_API_KEY,
    Emulator,
    Fault,
    GatewayError,
    RecordedRequest,
    Reply,
    UploadedFile,
)
from .images import flat, photo_like, render
from .llm_vin import LlmVinEmulator
from .modelmax import ModelmaxEmulator
from .nano_gpt import NanoGptEmulator
from .nexllm import NexLLMEmulator
from .openai import OpenAIEmulator

# Keys are the project's provider (manifest) ids.
EMULATORS: dict[str, type[Emulator]] = {
    "openai": OpenAIEmulator,
    "nexllm": NexLLMEmulator,
    "ai-nebula": AiNebulaEmulator,
    "nano-gpt": NanoGptEmulator,
    "llm-vin": LlmVinEmulator,
    "modelmax": ModelmaxEmulator,
}

__all__ = [
    "DEFAULT_API_KEY",
    "EMULATORS",
    "AiNebulaEmulator",
    "Emulator",
    "Fault",
    "GatewayError",
    "LlmVinEmulator",
    "ModelmaxEmulator",
    "NanoGptEmulator",
    "NexLLMEmulator",
    "OpenAIEmulator",
    "RecordedRequest",
    "Reply",
    "UploadedFile",
    "flat",
    "photo_like",
    "render",
]
