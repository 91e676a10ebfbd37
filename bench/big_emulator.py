"""The OpenAI emulator (tests/emulators/openai.py) with gpt-image-1 also taking large square sizes.

OpenAI's gpt-image-1 takes 1024x1024, 1536x1024, 1024x1536 and auto, and both the emulator and the
server's `openai` manifest hold to that, so a 4096x4096 result cannot be had through them. For the
large-result memory measurement the suite points a `provider = "openai-compatible"` endpoint (no
size list: any WxH) at this variant, which also takes `response_format=b64_json` (the plain
OpenAI-compatible dialect sends it). Everything else is the emulator unchanged.

    python -m bench.big_emulator --port P [--latency S] [--image flat|photo] [--api-key K]

Prints `READY <base_url>` on stdout when listening, like `python -m tests.emulators`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import ClassVar

from tests.emulators.base import DEFAULT_API_KEY, Emulator
from tests.emulators.openai import GPT_IMAGE_1, ImageModel, OpenAIEmulator

BIG_SIZES = ("2048x2048", "4096x4096")

GPT_IMAGE_1_BIG = dataclasses.replace(
    GPT_IMAGE_1,
    sizes=(*GPT_IMAGE_1.sizes, *BIG_SIZES),
    gen_fields=GPT_IMAGE_1.gen_fields | {"response_format"},
    default_response_format="b64_json",
)


class BigOpenAIEmulator(OpenAIEmulator):
    image_models: ClassVar[dict[str, ImageModel]] = {**OpenAIEmulator.image_models, GPT_IMAGE_1_BIG.id: GPT_IMAGE_1_BIG}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.big_emulator", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--image", choices=("flat", "photo"), default="flat")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    args = parser.parse_args(argv)
    emu = BigOpenAIEmulator(
        api_key=args.api_key,
        latency_s=args.latency,
        image_kind=args.image,
        host=args.host,
        port=args.port,
        max_recorded=16,
        serve_retired=True,  # gpt-image-1's id, made to take big sizes: a stand-in, not a model claim
    )

    def ready(e: Emulator) -> None:
        print(f"READY {e.base_url}", flush=True)

    emu.serve_forever(ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
