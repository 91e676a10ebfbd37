"""The OpenAI emulator as a gateway that takes only a few requests at a time.

It serves `--capacity K` image requests at once (each after `--latency` seconds) and answers any
beyond with 429 and `Retry-After: --retry-after`, as a gateway's per-key concurrency limit does.
`GET /_stats` tells the benchmark how many 429s it sent and the most requests it had at once;
`GET /_stats?reset=1` also starts both counts afresh.

    python -m bench.limited_emulator --port P --capacity 4 [--retry-after 1] [--latency S] [--api-key K]

Prints `READY <base_url>` on stdout when listening, like `python -m tests.emulators`.
"""

from __future__ import annotations

import argparse
import sys

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.emulators.base import DEFAULT_API_KEY, Emulator
from tests.emulators.openai import OpenAIEmulator


class LimitedOpenAIEmulator(OpenAIEmulator):
    def _build_routes(self) -> list[Route]:
        return [Route("/_stats", self._stats, methods=["GET"]), *super()._build_routes()]

    async def _stats(self, request: Request) -> JSONResponse:
        with self._lock:
            stats = {"rejected": self.rejected, "max_in_flight": self.max_in_flight}
            if request.query_params.get("reset"):
                self.rejected = 0
                self.max_in_flight = self.in_flight
        return JSONResponse(stats)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.limited_emulator",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--capacity", type=int, required=True, help="image requests served at once")
    parser.add_argument("--retry-after", type=float, default=1.0, help="seconds, sent with each 429")
    parser.add_argument("--latency", type=float, default=0.0)
    parser.add_argument("--image", choices=("flat", "photo"), default="flat")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    args = parser.parse_args(argv)
    emu = LimitedOpenAIEmulator(
        api_key=args.api_key,
        latency_s=args.latency,
        image_kind=args.image,
        host=args.host,
        port=args.port,
        max_recorded=16,
    )
    emu.capacity, emu.capacity_retry_after = args.capacity, args.retry_after

    def ready(e: Emulator) -> None:
        print(f"READY {e.base_url}", flush=True)

    emu.serve_forever(ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
