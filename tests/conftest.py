"""Shared fixtures: an isolated environment, settings builders and gateway emulators."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from mcp_imagegen.config import WELL_KNOWN_KEY_ENVS, Settings
from mcp_imagegen.manifests import load_manifest
from tests.emulators import EMULATORS, Emulator

# Property tests draw the same examples on every run: a test suite that passes once passes always.
hypothesis_settings.register_profile("repeatable", derandomize=True)
hypothesis_settings.load_profile("repeatable")

# A key that must never show up in any output; tests search for it.
SECRET_KEY = "sk-test-SECRET-0123456789abcdef"


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test reads the developer's keys, configuration or Pictures folder."""
    for key_env, url_env in WELL_KNOWN_KEY_ENVS.values():
        monkeypatch.delenv(key_env, raising=False)
        if url_env:
            monkeypatch.delenv(url_env, raising=False)
    for name in ("MCP_IMAGEGEN_CONFIG", "MCP_IMAGEGEN_AUTH_TOKEN", "MCP_IMAGEGEN_LOG_LEVEL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))
    monkeypatch.setenv("MCP_IMAGEGEN_OUTPUT_DIR", str(tmp_path / "out"))


@pytest.fixture(autouse=True)
def restored_logging() -> Iterator[None]:
    """A test that runs the CLI in-process installs a handler on the stderr pytest captured and
    closes afterwards; put logging back as it was, so no later log line meets a closed stream."""
    root = logging.getLogger()
    ours = logging.getLogger("mcp_imagegen")
    handlers, root_level, our_level = list(root.handlers), root.level, ours.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    for handler in handlers:
        if handler not in root.handlers:
            root.addHandler(handler)
    root.setLevel(root_level)
    ours.setLevel(our_level)


def endpoint_for(emu: Emulator, name: str | None = None, **fields: Any) -> dict[str, Any]:
    """An endpoint table pointing at an emulator, with its key in the settings (not the env)."""
    provider = fields.pop("provider", emu.provider_id)
    entry = {"name": name or provider, "provider": provider, "base_url": emu.base_url, **fields}
    return entry


def make_settings(tmp_path: Path, endpoints: list[dict[str, Any]], **fields: Any) -> Settings:
    """Settings as load_settings would build them, with keys filled in from `key` entries."""
    from pydantic import SecretStr

    keys = [ep.pop("key", None) for ep in endpoints]
    settings = Settings.model_validate({"output_dir": tmp_path / "out", "endpoints": endpoints, **fields})
    for ep, key in zip(settings.endpoints, keys):
        load_manifest(ep.provider)
        if key:
            ep.api_key = SecretStr(key)
    return settings


@pytest.fixture
def emulator() -> Iterator[Callable[..., Emulator]]:
    """Start emulators by provider id; all are stopped when the test ends."""
    started: list[Emulator] = []

    def start(provider: str, **kwargs: Any) -> Emulator:
        emu = EMULATORS[provider](**kwargs)
        emu.start()
        started.append(emu)
        return emu

    yield start
    for emu in started:
        emu.stop()


class GatedSleep:
    """A stand-in for `anyio.sleep` that returns only when the test opens its gate: code that waits
    for time to pass is tested by deciding when the time is up, not by waiting for it."""

    def __init__(self) -> None:
        self.waiting: list[tuple[float, Any]] = []  # (seconds asked for, the anyio.Event to set)

    async def __call__(self, seconds: float) -> None:
        import anyio

        gate = anyio.Event()
        self.waiting.append((seconds, gate))
        await gate.wait()

    def open_all(self) -> int:
        gates = [gate for _, gate in self.waiting if not gate.is_set()]
        for gate in gates:
            gate.set()
        return len(gates)


async def wait_until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    """Let other tasks run until `condition` holds (at least one pass through the event loop)."""
    import anyio

    with anyio.fail_after(timeout_s):
        await anyio.sleep(0.01)
        while not condition():
            await anyio.sleep(0.01)
