"""The command line: serve MCP, or do the tools' work from a shell through the same engine.

Imports stay inside the commands so that `mcp-imagegen` starts serving without loading what the
chosen command does not use.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from . import __version__

# The stdio relay starts before argparse, json or typing are loaded (see relay.py): names used
# only in annotations are imported for type checkers alone.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from typing import Any

AUTH_TOKEN_ENV = "MCP_IMAGEGEN_AUTH_TOKEN"


def _parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="mcp-imagegen",
        description="MCP server for image generation and editing through OpenAI-compatible gateways.",
    )
    parser.add_argument("--version", action="version", version=f"mcp-imagegen {__version__}")
    parser.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper)
    # Serving is the default command, so its options work with or without the word `serve`.
    _serve_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="serve MCP (stdio by default; the default command)")
    _serve_arguments(serve, argparse.SUPPRESS)

    gen = sub.add_parser("generate", help="generate images from a prompt and print each saved path")
    gen.add_argument("prompt")
    _work_arguments(gen)

    edit = sub.add_parser("edit", help="edit images (paths, URLs, data URLs or imagegen:// URIs)")
    edit.add_argument("prompt")
    edit.add_argument("images", nargs="+", metavar="IMAGE")
    edit.add_argument("--mask", help="mask image: transparent (alpha) or white (no alpha) marks the area to change")
    edit.add_argument("--strength", type=float)
    _work_arguments(edit)

    models = sub.add_parser("models", help="list models per endpoint")
    models.add_argument("--capability", choices=["generate", "edit", "mask", "multi_image"])
    models.add_argument("--endpoint")
    models.add_argument("--refresh", action="store_true", help="ask the gateways again instead of the cache")
    models.add_argument("--json", action="store_true", help="print the structured result")

    doctor = sub.add_parser("doctor", help="check the configuration, keys, endpoints and output folder")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--offline", action="store_true", help="skip the network checks")
    return parser


def _serve_arguments(p: argparse.ArgumentParser, default: Any = None) -> None:
    """`default=SUPPRESS` on the subcommand keeps values given before the word `serve`."""

    def d(value: Any) -> Any:
        return value if default is None else default

    p.add_argument("--transport", choices=["stdio", "http", "sse"], default=d("stdio"))
    p.add_argument("--host", default=d("127.0.0.1"))
    p.add_argument("--port", type=int, default=d(8000))
    p.add_argument(
        "--auth-token", default=d(None), help=f"require 'Authorization: Bearer TOKEN' (or set {AUTH_TOKEN_ENV})"
    )
    p.add_argument(
        "--stateless", action="store_true", default=d(False), help="streamable HTTP without sessions, for replicas"
    )
    p.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        default=d(False),
        help="serve a non-loopback address without a token (only behind your own auth proxy)",
    )


def _work_arguments(p: argparse.ArgumentParser) -> None:
    import json

    p.add_argument("--model")
    p.add_argument("--endpoint")
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--size", help="WxH, e.g. 1024x1024 (see `mcp-imagegen models`)")
    p.add_argument("--quality")
    p.add_argument("--style")
    p.add_argument("--seed", type=int)
    p.add_argument("--output-format", choices=["png", "jpeg", "webp"])
    p.add_argument("--extra", type=json.loads, default=None, help="gateway-specific parameters as a JSON object")
    p.add_argument("--out", help="folder to save into (default: output_dir from the configuration)")
    p.add_argument("--json", action="store_true", help="print the structured result instead of paths")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def main(argv: Sequence[str] | None = None) -> int:
    from . import relay

    given = list(sys.argv[1:] if argv is None else argv)
    if relay.wanted() and relay.serves_stdio(given):  # before anything heavy is imported
        return relay.run(given)
    args = _parser().parse_args(argv)
    command = args.command or "serve"
    if command == "serve" and args.transport == "stdio" and relay.wanted():
        return relay.run(given)

    from .config import load_settings
    from .errors import ImageGenError
    from .logs import configure_logging

    try:
        settings = load_settings()
    except ImageGenError as exc:
        configure_logging(args.log_level)
        if command == "doctor":
            print(f"[FAIL] configuration: {exc.message}")
            print("       hint: fix the named key in the file, or unset MCP_IMAGEGEN_CONFIG to use the defaults")
            return 1
        print(f"mcp-imagegen: {exc.message}", file=sys.stderr)
        return 2
    secrets = [ep.api_key.get_secret_value() for ep in settings.endpoints if ep.api_key]
    token = args.auth_token or os.environ.get(AUTH_TOKEN_ENV)
    configure_logging(args.log_level, [*secrets, *([token] if token else [])])

    if command == "serve":
        try:
            return _serve(settings, args, token)
        except ImageGenError as exc:  # e.g. a public bind without a token
            print(f"mcp-imagegen: {exc.message}", file=sys.stderr)
            return 2
    if command == "doctor":
        from .doctor import run_doctor

        return run_doctor(settings, as_json=args.json, network=not args.offline)

    import anyio

    try:
        return anyio.run(_run_work, command, settings, args)
    except ImageGenError as exc:
        print(f"mcp-imagegen: {exc.agent_text()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mcp-imagegen: interrupted; images already received were saved", file=sys.stderr)
        return 130


def _serve(settings: Any, args: argparse.Namespace, token: str | None) -> int:
    from . import transports
    from .heap import configure_malloc

    configure_malloc()  # before the transports start any thread

    if args.transport == "stdio":
        transports.run_stdio(settings)
    elif args.transport == "http":
        transports.run_http(
            settings,
            host=args.host,
            port=args.port,
            auth_token=token,
            stateless=args.stateless,
            allow_unauthenticated=args.allow_unauthenticated,
        )
    else:
        transports.run_sse(
            settings,
            host=args.host,
            port=args.port,
            auth_token=token,
            allow_unauthenticated=args.allow_unauthenticated,
        )
    return 0


async def _run_work(command: str, settings: Any, args: argparse.Namespace) -> int:
    from pathlib import Path

    from .models import ImageRequest, given_knobs
    from .service import ImageService

    if command != "models" and args.out:
        settings = settings.model_copy(update={"output_dir": Path(args.out).expanduser()})
    async with ImageService(settings, previews=False) as service:
        if command == "models":
            return await _models(service, args)
        images, mask = [], None
        if command == "edit":
            images, mask = await service.resolve_inputs(args.images, args.mask)
        knobs = given_knobs(
            quality=args.quality,
            style=args.style,
            seed=args.seed,
            output_format=args.output_format,
            strength=getattr(args, "strength", None),
        )
        request = ImageRequest(
            operation="edit" if command == "edit" else "generate",
            prompt=args.prompt,
            model=args.model,
            endpoint=args.endpoint,
            n=args.n,
            size=args.size,
            images=images,
            mask=mask,
            knobs=knobs,
            extra=args.extra or {},
        )

        async def progress(done: float, total: float | None, message: str) -> None:
            if not args.quiet:
                print(f"[{int(done)}/{int(total or 0)}] {message}", file=sys.stderr, flush=True)

        result = await service.generate(request, progress=progress)
    if args.json:
        print(result.model_dump_json(indent=2, exclude_none=True))
    else:
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for image in result.images:
            print(image.path)
    return 0


async def _models(service: Any, args: argparse.Namespace) -> int:
    import json

    models, warnings = await service.list_models(
        capability=args.capability, endpoint=args.endpoint, refresh=args.refresh
    )
    if args.json:
        print(json.dumps({"models": [m.model_dump(exclude_none=True) for m in models], "warnings": warnings}, indent=2))
        return 0
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    rows = [("ENDPOINT", "MODEL", "CAPABILITIES", "SIZES", "MAX N")]
    for m in models:
        sizes = ", ".join(m.sizes) if m.sizes else m.size_rules or "any"
        rows.append((m.endpoint, m.id, ",".join(m.capabilities), sizes, str(m.max_n or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
