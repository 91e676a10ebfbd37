"""Run one emulator in the foreground:

    python -m tests.emulators nano-gpt --port 8000 [--latency 1.0] [--image photo|flat] [--api-key K]
                                  [--no-auth] [--warm 1024x1024,1536x1024] [--serve-retired]

Prints the base URL on stderr once listening, and `READY <base_url>` on stdout (flushed), so a
benchmark can start it as a subprocess and wait for that line.
"""

from __future__ import annotations

import argparse
import logging
import sys

from . import EMULATORS
from .base import DEFAULT_API_KEY, Emulator, parse_size
from .images import render


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.emulators", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("provider", choices=sorted(EMULATORS))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds to wait before each answer")
    parser.add_argument("--image", choices=("flat", "photo"), default="flat")
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    parser.add_argument(
        "--warm",
        default="",
        metavar="SIZES",
        help="comma-separated WxH sizes to pre-render before READY, e.g. 1024x1024,1536x1024",
    )
    parser.add_argument("--no-auth", action="store_true", help="accept requests without a key")
    parser.add_argument(
        "--serve-retired",
        action="store_true",
        help="openai, modelmax: still serve the models their providers shut down (gpt-image-1, imagen-3, ...)",
    )
    parser.add_argument("--log-level", default="warning")
    args = parser.parse_args(argv)

    logging.basicConfig(stream=sys.stderr, level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    extra = {"serve_retired": True} if args.serve_retired else {}
    emu = EMULATORS[args.provider](
        **extra,
        api_key=args.api_key,
        auth_required=False if args.no_auth else None,
        latency_s=args.latency,
        image_kind=args.image,
        host=args.host,
        port=args.port,
        max_recorded=16,  # nobody reads them in a subprocess; keep memory flat over long runs
        log_level=args.log_level,
    )

    for size in filter(None, args.warm.split(",")):
        w, h = parse_size(size.strip())
        render(args.image, w, h)  # Pillow encoding is slow: keep it out of the measured requests

    def ready(e: Emulator) -> None:
        print(f"{args.provider} emulator listening at {e.base_url}", file=sys.stderr, flush=True)
        print(f"READY {e.base_url}", flush=True)

    emu.serve_forever(ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
