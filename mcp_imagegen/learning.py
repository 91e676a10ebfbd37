"""Learning from a gateway's 400 answers, which cost nothing and say exactly what a model takes.

`lesson_from` reads one refused request (OpenAI's `error.param` / `error.code`, and the messages
gateways commonly use: "Unknown parameter: 'x'", "Invalid value ... Supported values are: ...",
"integer above maximum value ... <= N", "'x' is not supported for this model") into a `Lesson`
about one wire field. `apply_lessons` turns lessons into spec fields (the top layer of
resolution.py), and `LearnedFacts` keeps them per endpoint and model in a small JSON file, across
restarts, until they expire.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .models import CANONICAL_KNOBS

log = logging.getLogger("mcp_imagegen.learning")

LESSON_TTL_S = 30 * 24 * 3600.0  # models change; a lesson is re-learned (for free) after a month
STATE_FILE = "learned-models.json"
# Wire fields whose refusal tells nothing about the model (they are the request itself).
_NOT_LESSONS = frozenset({"model", "prompt", "image", "image[]", "mask"})


@dataclass(frozen=True, slots=True)
class Lesson:
    """One fact about one wire field of one model on one endpoint, as the gateway stated it."""

    field: str
    refused: bool = False  # the model does not take the field at all
    values: tuple[str, ...] | None = None  # the values the model takes
    maximum: int | None = None  # the largest integer the model takes
    said: str = ""  # the gateway's words, shortened
    learned_at: float = 0.0

    def note(self) -> str:
        day = dt.datetime.fromtimestamp(self.learned_at or time.time(), dt.UTC).date().isoformat()
        if self.refused:
            what = f"does not take {self.field}"
        elif self.values is not None:
            what = f"{self.field} takes {', '.join(self.values)}"
        else:
            what = f"{self.field} is at most {self.maximum}"
        return f"learned from the gateway on {day}: {what}"

    def takes(self) -> str:
        """What the model takes instead, for an error message."""
        if self.refused:
            return f"the model does not take {self.field}"
        if self.values is not None:
            return f"it takes: {', '.join(self.values)}"
        return f"it takes at most {self.maximum}"


# --- reading a refusal ---------------------------------------------------------------------------

_QUOTED = r"['\"`]([A-Za-z0-9_\[\].-]+)['\"`]"
_UNKNOWN = re.compile(
    r"(?:unknown|unrecognized|unsupported|unexpected) (?:parameter|field|argument|property)s?:? " + _QUOTED,
    re.I,
)
# Only a sentence about the field itself: "Parameter 'x' is not supported", "'x' is not
# supported for this model". A value or a combination refused ("transparent background is not
# supported for the 'jpeg' output format") is not a lesson about the field.
_NOT_SUPPORTED = re.compile(
    r"(?:parameter|field|argument)\s+" + _QUOTED + r"\s+is\s+not\s+(?:supported|allowed)"
    r"|" + _QUOTED + r"\s+is\s+not\s+(?:supported|allowed)\s+(?:for|by|with|on)\s+(?:this|the)\s+model",
    re.I,
)
_SUPPORTED_VALUES = re.compile(r"(?:supported|allowed|valid) values (?:are|is)\s*:?\s*(.+?)(?:\.\s|\.$|$)", re.I)
_ABOVE_MAX = re.compile(r"(?:<=|at most|maximum(?: value)?(?: of| is)?)\s*(\d+)", re.I)
_BETWEEN = re.compile(r"\b" + r"([A-Za-z_]+) must be an? (?:integer|number) between (\d+) and (\d+)", re.I)
_VALUE_LIST = re.compile(r"['\"`]([^'\"`]+)['\"`]")


def lesson_from(
    status: int | None, message: str | None, param: str | None = None, code: str | None = None
) -> Lesson | None:
    """The lesson in one 400/422 answer, or None when it names no field the model refuses."""
    if status not in (400, 422) or not message:
        return None
    text = message.strip()
    said = text[:200]
    now = time.time()
    code = (code or "").lower()
    param = (param or "").strip() or None

    between = _BETWEEN.search(text)
    if between and (param is None or param == between.group(1)):
        return _lesson(between.group(1), maximum=int(between.group(3)), said=said, at=now)
    unknown = _UNKNOWN.search(text)
    if code in ("unknown_parameter", "unsupported_parameter") or unknown:
        name = param or (unknown.group(1) if unknown else None)
        return _lesson(name, refused=True, said=said, at=now)
    supported = _SUPPORTED_VALUES.search(text)
    if supported and param:
        values = tuple(v.strip() for v in _VALUE_LIST.findall(supported.group(1)) if v.strip())
        if values:
            return _lesson(param, values=values, said=said, at=now)
    if code in ("integer_above_max_value",) or ("above maximum" in text.lower() and param):
        top = _ABOVE_MAX.search(text)
        if top and param:
            return _lesson(param, maximum=int(top.group(1)), said=said, at=now)
    not_supported = _NOT_SUPPORTED.search(text)
    if not_supported:
        named = not_supported.group(1) or not_supported.group(2)
        if param is None or param == named:
            return _lesson(named, refused=True, said=said, at=now)
    return None


def _lesson(name: str | None, *, said: str, at: float, **facts: Any) -> Lesson | None:
    if not name or name in _NOT_LESSONS:
        return None
    return Lesson(field=name, said=said, learned_at=at, **facts)


# --- lessons as spec fields ---------------------------------------------------------------------


def apply_lessons(fields: Mapping[str, Any], lessons: Iterable[Lesson]) -> dict[str, Any]:
    """The spec fields that lessons change, given the fields resolved below them."""
    out: dict[str, Any] = {}
    refused = list(fields.get("refused_fields") or [])
    knobs = fields.get("knobs")
    overrides = dict(fields.get("knob_overrides") or {})
    accepted = dict(fields.get("accepted_values") or {})
    for lesson in lessons:
        name = lesson.field
        if lesson.refused:
            if name not in refused:
                refused.append(name)
            out["refused_fields"] = refused
            if name == "response_format":
                out["response_format"] = False
            if knobs is not None and name in knobs:
                knobs = [k for k in knobs if k != name]
                out["knobs"] = knobs
        elif name == "n" and lesson.maximum is not None:
            out["max_n"] = max(1, lesson.maximum)
        elif name == "size" and lesson.values is not None:
            out["sizes"] = list(lesson.values)
            out["size_rule"] = None
            if fields.get("default_size") not in lesson.values:
                out["default_size"] = None  # the gateway picks, rather than a size it refused
        elif name in CANONICAL_KNOBS and (lesson.values is not None or lesson.maximum is not None):
            spec: dict[str, Any] = {"type": "string", "enum": list(lesson.values)} if lesson.values else {
                "type": "number",
                "max": lesson.maximum,
            }
            overrides[name] = spec
            out["knob_overrides"] = overrides
            if knobs is not None and name not in knobs:
                knobs = [*knobs, name]
                out["knobs"] = knobs
        elif lesson.values is not None:
            accepted[name] = list(lesson.values)
            out["accepted_values"] = accepted
    return out


# --- keeping lessons ------------------------------------------------------------------------------


class LearnedFacts:
    """Lessons per endpoint and model, in memory and in a JSON file (written atomically)."""

    def __init__(self, path: Path | None, ttl_s: float = LESSON_TTL_S) -> None:
        self.path = path
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._facts: dict[str, dict[str, list[Lesson]]] = {}
        self._loaded = path is None

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Read the file once (blocking: the service calls it through work.on_disk)."""
        with self._lock:
            self._load()

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        assert self.path is not None
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:  # a damaged file only costs re-learning
            log.warning("ignoring learned model facts in %s: %s", self.path.name, exc)
            return
        now = time.time()
        for endpoint, models in (raw.get("endpoints") or {}).items():
            for model, items in (models or {}).items():
                for item in items or []:
                    try:
                        lesson = Lesson(
                            field=str(item["field"]),
                            refused=bool(item.get("refused", False)),
                            values=tuple(item["values"]) if item.get("values") is not None else None,
                            maximum=int(item["maximum"]) if item.get("maximum") is not None else None,
                            said=str(item.get("said", "")),
                            learned_at=float(item["learned_at"]),
                        )
                    except (KeyError, TypeError, ValueError):
                        continue
                    if now - lesson.learned_at < self.ttl_s:
                        self._facts.setdefault(endpoint, {}).setdefault(model, []).append(lesson)

    def lessons(self, endpoint: str, model: str) -> list[Lesson]:
        """The lessons still fresh for a model on an endpoint (the file is read on first use)."""
        with self._lock:
            self._load()
            kept = self._facts.get(endpoint, {}).get(model, [])
            now = time.time()
            return [lesson for lesson in kept if now - lesson.learned_at < self.ttl_s]

    def add(self, endpoint: str, model: str, lesson: Lesson) -> None:
        """Remember a lesson (replacing an older one about the same field) and save the file.

        Blocking file I/O: call it in a worker thread (work.on_disk)."""
        with self._lock:
            self._load()
            kept = self._facts.setdefault(endpoint, {}).setdefault(model, [])
            kept[:] = [old for old in kept if old.field != lesson.field] + [lesson]
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        doc = {
            "version": 1,
            "endpoints": {
                ep: {model: [_as_json(lesson) for lesson in items] for model, items in models.items() if items}
                for ep, models in self._facts.items()
            },
        }
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:  # memory still has the lesson; only the restart loses it
            log.warning("cannot save learned model facts to %s: %s", self.path, exc.strerror)
            tmp.unlink(missing_ok=True)


def _as_json(lesson: Lesson) -> dict[str, Any]:
    data = asdict(lesson)
    if data["values"] is not None:
        data["values"] = list(data["values"])
    return {k: v for k, v in data.items() if v not in (None, False, "")}
