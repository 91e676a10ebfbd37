"""The command line: serve MCP, or do the tools' work from a shell through the same engine.

Imports stay inside the commands so that `mcp-imagegen` starts serving without loading what the
chosen command does not use.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence

from . import __version__

# The stdio relay starts before argparse, json or typing are loaded (see relay.py): names used
# only in annotations are imported for type checkers alone.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from pathlib import Path
    from typing import Any

AUTH_TOKEN_ENV = "MCP_IMAGEGEN_AUTH_TOKEN"


def _help_formatter() -> type[argparse.HelpFormatter]:
    import argparse

    class Help(argparse.ArgumentDefaultsHelpFormatter):
        """Shows each option's default, except where there is none to show (None, False, SUPPRESS)."""

        def _get_help_string(self, action: argparse.Action) -> str | None:
            if action.default in (None, False, argparse.SUPPRESS) or isinstance(action, argparse._VersionAction):
                return action.help
            return super()._get_help_string(action)

    return Help


def _parser() -> argparse.ArgumentParser:
    import argparse

    help_formatter = _help_formatter()
    parser = argparse.ArgumentParser(
        prog="mcp-imagegen",
        description="MCP server for image generation and editing through OpenAI-compatible gateways. "
        "With no command it serves MCP over stdio, for an MCP client (Claude Desktop, Claude Code, "
        "Cursor, VS Code, an agent) to start. The other commands do the tools' work from a shell.",
        epilog="Configuration: MCP_IMAGEGEN_CONFIG names a TOML file; without one, each gateway key "
        "variable that is set (OPENAI_API_KEY, NANOGPT_API_KEY, ...) makes an endpoint, and with none "
        "the built-in offline endpoint serves. `mcp-imagegen doctor` checks the setup.",
        formatter_class=help_formatter,
    )
    parser.add_argument("--version", action="version", version=f"mcp-imagegen {__version__}")
    _common_arguments(parser, None)
    # Serving is the default command, so its options work with or without the word `serve`.
    _serve_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", formatter_class=help_formatter)
        # The same options after the command: SUPPRESS keeps a value given before it.
        _common_arguments(p, argparse.SUPPRESS)
        return p

    serve = command("serve", "serve MCP (stdio by default; the default command)")
    _serve_arguments(serve, argparse.SUPPRESS)

    gen = command("generate", "generate images from a prompt and print each saved path")
    gen.add_argument("prompt", help="what the image should show")
    _work_arguments(gen)

    edit = command("edit", "edit images (paths, URLs, data URLs or imagegen:// URIs) and print each saved path")
    edit.add_argument("prompt", help="what to change")
    edit.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image(s) to edit: a file (anywhere you can read), an http(s) URL, a data URL or an "
        "imagegen://images/... URI",
    )
    edit.add_argument(
        "--mask",
        help="mask image, given like an IMAGE: transparent pixels (with alpha) or white pixels (without) "
        "mark the area to change",
    )
    edit.add_argument("--strength", type=float, help="how strongly to repaint, 0-1, where the model takes it")
    _work_arguments(edit)

    models = command("models", "list the models of every endpoint (what the list_models tool returns)")
    models.add_argument(
        "--capability",
        choices=["generate", "edit", "mask", "multi_image"],
        help="only models with this capability",
    )
    models.add_argument("--endpoint", help="only this configured endpoint's models")
    models.add_argument("--refresh", action="store_true", help="ask the gateways again instead of the cache")
    models.add_argument("--json", action="store_true", help="print the structured result")

    doctor = command("doctor", "check the configuration, keys, endpoints and output folder")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--offline", action="store_true", help="skip the network checks")
    return parser


def _common_arguments(p: argparse.ArgumentParser, default: Any) -> None:
    from .logs import LEVELS, LOG_LEVEL_ENV

    p.add_argument(
        "--log-level",
        choices=LEVELS,
        type=str.upper,
        default=default,
        help=f"how much to log on stderr (default: ${LOG_LEVEL_ENV}, else WARNING)",
    )


def _serve_arguments(p: argparse.ArgumentParser, default: Any = None) -> None:
    """`default=SUPPRESS` on the subcommand keeps values given before the word `serve`."""

    def d(value: Any) -> Any:
        return value if default is None else default

    def shown(help: str, value: Any) -> str:
        # With SUPPRESS the formatter has no default to show: say it here.
        return f"{help} (default: {value})" if default is not None else help

    p.add_argument(
        "--transport",
        choices=["stdio", "http", "sse"],
        default=d("stdio"),
        help=shown(
            "stdio for a client that starts the server; http (streamable HTTP at /mcp) or sse (legacy, "
            "at /sse) to serve over the network",
            "stdio",
        ),
    )
    p.add_argument("--host", default=d("127.0.0.1"), help=shown("address to listen on (http and sse)", "127.0.0.1"))
    p.add_argument(
        "--port", type=int, default=d(8000), help=shown("port to listen on (http and sse; 0 picks a free one)", 8000)
    )
    p.add_argument(
        "--auth-token",
        default=d(None),
        help=f"require 'Authorization: Bearer TOKEN' on every request (http and sse; or set {AUTH_TOKEN_ENV})",
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


def _json_object(text: str) -> dict[str, Any]:
    """`--extra`: a JSON object, or an error that says what is wrong with it."""
    import argparse
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); "
            """give an object such as '{"moderation": "low"}'"""
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"""must be a JSON object such as '{{"moderation": "low"}}', not {type(value).__name__}"""
        )
    return value


def _work_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="model id (see `mcp-imagegen models`); default: the endpoint's default model")
    p.add_argument("--endpoint", help="configured endpoint to use; default: one that serves the model")
    p.add_argument("--n", type=int, default=1, help="how many images")
    p.add_argument("--size", help="WxH, e.g. 1024x1024 (see `mcp-imagegen models`); default: the model's")
    p.add_argument("--quality", help="model-specific quality, e.g. low, medium, high, hd")
    p.add_argument("--style", help="model-specific style, e.g. vivid or natural")
    p.add_argument("--seed", type=int, help="seed for reproducible results, where the model takes one")
    p.add_argument(
        "--output-format", choices=["png", "jpeg", "webp"], help="file format, where the model lets you choose"
    )
    p.add_argument(
        "--extra",
        type=_json_object,
        metavar="JSON",
        help="""gateway-specific parameters as a JSON object, e.g. '{"moderation": "low"}'""",
    )
    p.add_argument("--out", help="folder to save into (default: output_dir from the configuration)")
    p.add_argument("--json", action="store_true", help="print the structured result instead of paths")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")


def _for_shell(text: str) -> str:
    """Tool errors speak to agents; on the command line, name the commands instead of the tools."""
    return (
        text.replace("Call list_models", "Run `mcp-imagegen models`")
        .replace("call list_models", "run `mcp-imagegen models`")
        .replace("list_models", "`mcp-imagegen models`")
    )


def main(argv: Sequence[str] | None = None) -> int:
    gc.disable()  # until start-up is over (heap.resume_collections)
    try:
        return _main(argv)
    finally:
        gc.enable()


def _main(argv: Sequence[str] | None) -> int:
    from . import relay

    given = list(sys.argv[1:] if argv is None else argv)
    if relay.wanted() and relay.serves_stdio(given):  # before anything heavy is imported
        code = relay.run()
        if code is not None:
            return code  # the relay's; the server (the forked child) goes on from here
    parser = _parser()
    args = parser.parse_args(argv)
    command = args.command or "serve"
    if command == "serve" and args.transport == "stdio" and relay.wanted():
        code = relay.run()
        if code is not None:
            return code

    from .config import load_settings
    from .errors import ImageGenError
    from .logs import LEVELS, LOG_LEVEL_ENV, configure_logging

    level = args.log_level or os.environ.get(LOG_LEVEL_ENV) or None
    if level is not None and level.upper() not in LEVELS:
        print(
            f"mcp-imagegen: {LOG_LEVEL_ENV}={level!r} is not a log level; use one of {', '.join(LEVELS)}",
            file=sys.stderr,
        )
        return 2

    try:
        settings = load_settings()
    except ImageGenError as exc:
        configure_logging(level)
        if command == "doctor":
            from .doctor import config_error_hint

            print(f"[FAIL] configuration: {exc.message}")
            print(f"       hint: {config_error_hint(exc)}")
            return 1
        print(f"mcp-imagegen: {exc.message}", file=sys.stderr)
        return 2
    secrets = [ep.api_key.get_secret_value() for ep in settings.endpoints if ep.api_key]
    token = args.auth_token or os.environ.get(AUTH_TOKEN_ENV)
    configure_logging(level, [*secrets, *([token] if token else [])])

    if command == "serve":
        try:
            return _serve(settings, args, token)
        except ImageGenError as exc:  # e.g. a public bind without a token
            print(f"mcp-imagegen: {exc.message}", file=sys.stderr)
            return 2
    from .heap import resume_collections

    if command != "serve":
        resume_collections()  # the server resumes them once it is built
    if command == "doctor":
        from .doctor import run_doctor

        return run_doctor(settings, as_json=args.json, network=not args.offline)

    import anyio

    try:
        return anyio.run(_run_work, command, settings, args)
    except ImageGenError as exc:
        print(f"mcp-imagegen: {_for_shell(exc.agent_text())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mcp-imagegen: interrupted; images already received were saved", file=sys.stderr)
        return 130


def _serve(settings: Any, args: argparse.Namespace, token: str | None) -> int:
    from . import transports
    from .heap import configure_malloc

    configure_malloc()  # before the transports start any thread

    if args.transport == "stdio":
        if sys.stdin.isatty():
            # Someone typed `mcp-imagegen` at a prompt; an MCP client would have piped stdin.
            print(
                "mcp-imagegen: serving MCP on stdin/stdout, waiting for an MCP client (Claude Desktop, "
                "Claude Code, Cursor, ...) to talk to it; press Ctrl+C to stop. "
                "See `mcp-imagegen --help` for the commands you can run from a shell.",
                file=sys.stderr,
                flush=True,
            )
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
    from .models import ImageRequest, given_knobs
    from .service import ImageService

    if command != "models" and args.out:
        from pathlib import Path

        settings = settings.model_copy(update={"output_dir": Path(args.out).expanduser()})
    async with ImageService(settings, previews=False) as service:
        if command == "models":
            return await _models(service, args)
        images, mask = [], None
        if command == "edit":
            named = [spec for spec in [*args.images, args.mask] if spec]
            images, mask = await service.resolve_inputs(args.images, args.mask, readable=_named_files(named))
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
            print(f"warning: {_for_shell(warning)}", file=sys.stderr)
        for image in result.images:
            print(image.path)
    return 0


def _named_files(specs: list[str]) -> list[Path]:
    """Files the person named on the command line: theirs to read wherever they are (the
    allowed-roots fence is for paths that agents send through the tools). A missing one is
    included too, so that the error says it does not exist rather than that it is fenced off."""
    from pathlib import Path

    files = []
    for spec in specs:
        if spec.startswith(("http://", "https://", "data:", "imagegen://")):
            continue
        # Inline base64 that passes this only adds a path that no file is at.
        if len(spec) < 4096 and not any(c in spec for c in "\0\n"):
            files.append(Path(spec).expanduser().resolve())
    return files


async def _models(service: Any, args: argparse.Namespace) -> int:
    import json

    models, warnings = await service.list_models(
        capability=args.capability, endpoint=args.endpoint, refresh=args.refresh
    )
    # An endpoint without its key is listed (from its manifest) but is an error: nothing works there.
    missing = _missing_keys(service, args.endpoint)
    if args.json:
        print(json.dumps({"models": [m.model_dump(exclude_none=True) for m in models], "warnings": warnings}, indent=2))
        return 1 if missing else 0
    for warning in warnings:
        if not any(error.message in warning for error in missing):
            print(f"warning: {_for_shell(warning)}", file=sys.stderr)
    rows = [("ENDPOINT", "MODEL", "CAPABILITIES", "SIZES", "MAX N")]
    for m in models:
        sizes = ", ".join(m.sizes) if m.sizes else m.size_rules or "any"
        rows.append((m.endpoint, m.id, ",".join(m.capabilities), sizes, str(m.max_n or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    for error in missing:
        print(f"mcp-imagegen: {error.message}", file=sys.stderr)
    return 1 if missing else 0


def _missing_keys(service: Any, endpoint: str | None) -> list[Any]:
    """The errors for the listed endpoints that cannot be used until their key is set."""
    from .catalog import missing_key_error
    from .manifests import load_manifest

    endpoints = [ep for ep in service.settings.endpoints if endpoint in (None, ep.name)]
    errors = (missing_key_error(ep, load_manifest(ep.provider)) for ep in endpoints)
    return [e for e in errors if e is not None]


if __name__ == "__main__":
    sys.exit(main())
