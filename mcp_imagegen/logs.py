"""Logging to stderr only: on stdio, stdout belongs to the protocol.

Lines are `time level logger message key=value ...`, easy to grep and to parse. A filter replaces
every configured API key with `***` as a last line of defence: code never logs keys on purpose,
and this makes sure a library's message cannot carry one out either.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable

LOG_LEVEL_ENV = "MCP_IMAGEGEN_LOG_LEVEL"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Formatter(logging.Formatter):
    converter = time.gmtime

    def format(self, record: logging.LogRecord) -> str:
        stamp = self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z"
        line = f"{stamp} {record.levelname:<7} {record.name} {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line += "".join(f" {k}={_quote(v)}" for k, v in fields.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _quote(value: object) -> str:
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


class RedactSecrets(logging.Filter):
    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        # Short values would redact ordinary words; real keys are long.
        self._secrets = sorted({s for s in secrets if len(s) >= 8}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        text = record.getMessage()
        fields = getattr(record, "fields", None)
        hit = any(s in text for s in self._secrets) or (
            isinstance(fields, dict) and any(s in str(v) for v in fields.values() for s in self._secrets)
        )
        if hit:
            for secret in self._secrets:
                text = text.replace(secret, "***")
            record.msg, record.args = text, None
            if isinstance(fields, dict):
                record.fields = {k: _redact(str(v), self._secrets) for k, v in fields.items()}
        return True


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def configure_logging(level: str | None = None, secrets: Iterable[str] = ()) -> None:
    """Send every log line to stderr at `level` (flag, else MCP_IMAGEGEN_LOG_LEVEL, else WARNING)."""
    chosen = (level or os.environ.get(LOG_LEVEL_ENV) or "WARNING").upper()
    if chosen not in LEVELS:
        chosen = "WARNING"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    handler.addFilter(RedactSecrets(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("mcp_imagegen").setLevel(chosen)
