"""`mcp-imagegen doctor`: a readable check of everything a working setup needs.

Each check is a line with a verdict and, for a problem, a hint that says what to change. Keys are
reported as present or missing, never shown. The exit status is non-zero when anything failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

from .catalog import missing_key_error
from .config import CONFIG_ENV, OUTPUT_DIR_ENV, Settings, config_path
from .manifests import load_manifest

Verdict = Literal["ok", "warn", "fail"]


@dataclass
class Check:
    subject: str
    verdict: Verdict
    detail: str
    hint: str = ""


def config_error_hint(exc: Exception) -> str:
    """What to do about a configuration that could not be loaded."""
    return getattr(exc, "hint", None) or "fix the configuration, or unset MCP_IMAGEGEN_CONFIG to use the defaults"


def _config_checks(settings: Settings) -> list[Check]:
    path, explicit = config_path(os.environ)
    if settings.source:
        return [Check("configuration", "ok", f"read {settings.source}")]
    origin = "the built-in offline endpoint" if settings.endpoints[0].provider == "offline" else "environment keys"
    return [
        Check(
            "configuration",
            "ok",
            f"no file at {path}; using {origin}",
            "" if explicit else f"to configure endpoints, create {path} or set {CONFIG_ENV}",
        )
    ]


def _output_checks(settings: Settings) -> list[Check]:
    out = settings.output_dir
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".doctor-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return [
            Check(
                "output_dir",
                "fail",
                f"{out} is not writable ({exc.strerror})",
                f"set output_dir in the configuration or {OUTPUT_DIR_ENV} to a writable folder",
            )
        ]
    return [Check("output_dir", "ok", f"{out} is writable")]


def _endpoint_static_checks(settings: Settings) -> list[Check]:
    checks: list[Check] = []
    for ep in settings.endpoints:
        manifest = load_manifest(ep.provider)  # load_settings already proved it valid
        subject = f"endpoint {ep.name}"
        checks.append(Check(subject, "ok", f"provider {ep.provider} ({manifest.name}); manifest valid"))
        if manifest.transport == "builtin":
            checks.append(Check(subject, "ok", "offline renderer: deterministic pictures, not an AI model"))
            continue
        key_env = ep.api_key_env or manifest.key_env
        if ep.api_key is not None:
            checks.append(Check(subject, "ok", f"key present in ${key_env}"))
        elif manifest.auth.required:
            checks.append(
                Check(subject, "fail", f"no key: ${key_env} is not set", f"export {key_env}=... before starting")
            )
        else:
            checks.append(Check(subject, "warn", f"no key in ${key_env}; this gateway serves some models without one"))
    return checks


async def _reachability(settings: Settings) -> list[Check]:
    import anyio

    from .errors import AuthenticationError, GatewayError, ImageGenError
    from .gateway import GatewayClient

    checks: list[Check] = []
    # An endpoint whose required key is missing is not contacted: that check already failed.
    http_endpoints = [
        ep
        for ep in settings.endpoints
        if load_manifest(ep.provider).transport == "http" and missing_key_error(ep, load_manifest(ep.provider)) is None
    ]
    if not http_endpoints:
        return checks
    async with GatewayClient(max_retries=0) as gateway:
        for ep in http_endpoints:
            manifest = load_manifest(ep.provider)
            base = ep.base_url or manifest.base_url or ""
            subject = f"endpoint {ep.name}"
            # The model list where the gateway has one; otherwise any HTTP answer from /models
            # proves the gateway is there (most relays serve it, the rest answer 404).
            path, relative_to = "/models", "base_url"
            if manifest.discovery is not None:
                path, relative_to = manifest.discovery.path, manifest.discovery.relative_to
            started = time.perf_counter()
            try:
                with anyio.fail_after(min(ep.timeout_s, 15)):
                    # Without a key, only ask whether the gateway is there; the missing key is
                    # already reported above.
                    await gateway.get_json(ep, manifest, path, relative_to, ep.api_key is not None)
                what = "answered"
            except AuthenticationError as exc:
                checks.append(
                    Check(
                        subject,
                        "fail",
                        f"{base} refused the key: {exc.message}",
                        f"check the value of ${ep.api_key_env or manifest.key_env} and the account it belongs to",
                    )
                )
                continue
            except (GatewayError, TimeoutError) as exc:
                message = exc.message if isinstance(exc, ImageGenError) else "timed out"
                checks.append(
                    Check(subject, "fail", f"{base} is not reachable: {message}", "check base_url and the network")
                )
                continue
            except ImageGenError as exc:
                what = f"answered (HTTP {exc.status or '?'} on {path})"
            ms = (time.perf_counter() - started) * 1000
            checks.append(Check(subject, "ok", f"{base} {what} in {ms:.0f} ms"))
    return checks


def run_doctor(settings: Settings, *, as_json: bool = False, network: bool = True) -> int:
    checks = [*_config_checks(settings), *_output_checks(settings), *_endpoint_static_checks(settings)]
    if network:
        import anyio

        checks.extend(anyio.run(_reachability, settings))
    failed = any(c.verdict == "fail" for c in checks)
    if as_json:
        print(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
        for c in checks:
            print(f"[{marks[c.verdict]}] {c.subject}: {c.detail}")
            if c.hint and c.verdict != "ok":
                print(f"       hint: {c.hint}")
            elif c.hint:
                print(f"       note: {c.hint}")
        print("all checks passed" if not failed else "some checks failed", file=sys.stderr)
    return 1 if failed else 0
