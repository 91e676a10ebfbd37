"""First contact with models nobody told the server about, against gateways that behave as today's.

The gateways here are the project's emulators, set up through their own hooks (model tables,
`listed_models`, `unknown_model`, injected faults) to serve what OpenAI and relays serve on
2026-12-01: the gpt-image-2 family, shut-down models that answer 404 "has been deprecated", a
`shutdown_date` in `/v1/models`, and a model no manifest names. Each test checks both what the
caller gets and what went over the wire.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image

from mcp_imagegen.errors import InvalidRequestError, ModelNotFoundError
from mcp_imagegen.models import ImageRequest, InputImage
from mcp_imagegen.service import ImageService
from tests.conftest import SECRET_KEY, endpoint_for, make_settings
from tests.emulators import (
    AiNebulaEmulator,
    Fault,
    LlmVinEmulator,
    ModelmaxEmulator,
    NanoGptEmulator,
    NexLLMEmulator,
    OpenAIEmulator,
)
from tests.emulators.openai import GPT_IMAGE_2, GPT_IMAGE_2_7_NOVA, ImageModel

pytestmark = pytest.mark.anyio

# A point release no manifest names, of a family the server knows (served by today's emulators).
UNNAMED = GPT_IMAGE_2_7_NOVA.id


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ListsShutDownIds(OpenAIEmulator):
    """OpenAI whose model list also names ids it no longer serves (with their shutdown dates)."""

    def listed_models(self) -> list[dict[str, Any]]:
        out = super().listed_models()
        out += [
            {"id": mid, "object": "model", "created": 1698785189, "owned_by": "system", "shutdown_date": day or None}
            for mid, day in self.shut_down.items()
        ]
        return out


def png(width: int = 1024, height: int = 1024, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height), (30, 120, 200, 255)[: len(mode)]).save(buf, "PNG")
    return buf.getvalue()


def alpha_mask(width: int = 1024, height: int = 1024) -> bytes:
    im = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    im.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def input_image(data: bytes) -> InputImage:
    with Image.open(io.BytesIO(data)) as im:
        return InputImage(data=data, mime_type="image/png", width=im.width, height=im.height, source="test.png")


def start(emu: Any) -> Any:
    emu.start()
    return emu


@pytest.fixture
def started() -> Any:
    emus: list[Any] = []

    def run(cls: type, **kw: Any) -> Any:
        emu = cls(api_key=SECRET_KEY, **kw)
        emu.start()
        emus.append(emu)
        return emu

    yield run
    for emu in emus:
        emu.stop()


async def run(settings: Any, request: ImageRequest) -> Any:
    async with ImageService(settings) as service:
        return await service.generate(request)


def refused(emu: Any) -> list[Any]:
    return [r for r in emu.requests if r.status is not None and r.status >= 400]


# --- first contact --------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", ["openai", "openai-compatible"])
async def test_unnamed_model_of_a_known_family_works_on_the_first_call(
    tmp_path: Path, started: Any, provider: str
) -> None:
    emu = started(OpenAIEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, provider=provider, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        made = await service.generate(
            ImageRequest("generate", "a fox", model=UNNAMED, n=3, size="2048x1152", knobs={"quality": "high"})
        )
        assert len(made.images) == 3 and made.model == UNNAMED
        one = input_image(png())
        edited = await service.generate(ImageRequest("edit", "add a hat", model=UNNAMED, images=[one]))
        masked = await service.generate(
            ImageRequest("edit", "sky", model=UNNAMED, images=[one], mask=input_image(alpha_mask()))
        )
        several = await service.generate(
            ImageRequest("edit", "merge", model=UNNAMED, images=[one, input_image(png(1024, 1536))], n=2)
        )
    assert len(edited.images) == len(masked.images) == 1 and len(several.images) == 2
    assert refused(emu) == []  # every call right the first time
    [sent] = emu.requests_to("/images/generations")  # n=3 in one request: the family takes 10
    assert sent.json == {"model": UNNAMED, "prompt": "a fox", "n": 3, "size": "2048x1152", "quality": "high"}
    edits = emu.requests_to("/images/edits")
    assert len(edits) == 3 and all("response_format" not in e.form for e in edits)
    assert list(edits[1].files) == ["image", "mask"]
    assert list(edits[2].files) == ["image[]"] and len(edits[2].files["image[]"]) == 2
    assert edits[2].form["n"] == "2"


async def test_no_model_on_todays_openai(tmp_path: Path, started: Any) -> None:
    emu = started(OpenAIEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest("generate", "a lighthouse"))
    # From the gateway's own list: the first gpt-image-2 model not already on its way out
    # (gpt-image-2 itself is listed with a shutdown date ahead).
    assert result.model == "gpt-image-2.5-flare" and len(result.images) == 1
    assert [r.json["model"] for r in emu.requests_to("/images/generations")] == ["gpt-image-2.5-flare"]
    edit = await run(settings, ImageRequest("edit", "x", images=[input_image(png())], mask=input_image(alpha_mask())))
    assert edit.model == "gpt-image-2.5-flare"
    assert refused(emu) == []


async def test_no_model_without_a_model_list_uses_the_manifests_current_default(tmp_path: Path, started: Any) -> None:
    emu = started(OpenAIEmulator)
    emu.inject(Fault.http(404, message="Not found"), times=None, path="/models")  # no list to ask
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest("generate", "a lighthouse"))
    assert result.model == "gpt-image-2" and len(result.images) == 1
    assert refused(emu) == [r for r in emu.requests if r.path.endswith("/models")]


# --- shut-down and deprecated models ----------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-3"])
async def test_shut_down_model_is_refused_naming_one_that_works(tmp_path: Path, started: Any, model: str) -> None:
    emu = started(OpenAIEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    with pytest.raises(ModelNotFoundError) as err:
        await run(settings, ImageRequest("generate", "x", model=model))
    assert model in err.value.message and "shut down" in err.value.message
    assert "'gpt-image-2'" in err.value.message
    assert emu.requests_to("/images/") == []  # refused before anything was sent


async def test_a_model_the_gateway_says_is_gone_is_sent_once(tmp_path: Path, started: Any) -> None:
    class ListsItWithoutDate(ListsShutDownIds):
        # The list still names it with no date, but it answers 404 "has been deprecated".
        shut_down: ClassVar[dict[str, str]] = {"gpt-image-2-early-access": ""}

    emu = started(ListsItWithoutDate)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        for _ in range(2):
            with pytest.raises(ModelNotFoundError) as err:
                await service.generate(ImageRequest("generate", "x", model="gpt-image-2-early-access"))
            assert "'gpt-image-2'" in err.value.message  # names one that works
    assert len(emu.requests_to("/images/generations")) == 1  # not retried, not sent twice


async def test_a_deprecated_model_works_with_a_warning(tmp_path: Path, started: Any) -> None:
    emu = started(ListsShutDownIds)  # lists gpt-image-1 as shut down, gpt-image-2 with a date ahead
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        models, _ = await service.list_models()
        listed = {m.id: m for m in models}
        assert "gpt-image-1" not in listed and "dall-e-3" not in listed  # shut down: not offered
        assert any("2027-03-02" in note for note in listed["gpt-image-2"].notes)
        result = await service.generate(ImageRequest("generate", "x", model="gpt-image-2"))
    assert len(result.images) == 1
    # Named with its date and what to use instead (OpenAI's list names no replacement: the
    # endpoint's own default stands in).
    assert any("deprecated" in w and "2027-03-02" in w and "gpt-image-2.5-flare" in w for w in result.warnings)


# --- learning from refusals -------------------------------------------------------------------------


async def test_a_refused_field_the_server_added_is_learned_retried_once_and_remembered(
    tmp_path: Path, started: Any
) -> None:
    emu = started(NanoGptEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, name="nano", key=SECRET_KEY)])
    refusal = {"error": {"message": "Unknown parameter: 'response_format'", "type": "invalid_request_error"}}
    emu.inject(Fault.http(400, body=refusal), times=1, path="/images/generations")
    result = await run(settings, ImageRequest("generate", "x", model="hidream"))
    assert len(result.images) == 1
    first, second = emu.requests_to("/images/generations")
    assert first.json["response_format"] == "b64_json" and "response_format" not in second.json
    assert any("refused response_format" in w and "sent once more" in w for w in result.warnings)

    # A restart: what was learned is still there, in list_models and in what is sent.
    async with ImageService(settings) as service:
        models, _ = await service.list_models(endpoint="nano")
        hidream = next(m for m in models if m.id == "hidream")
        assert any("response_format" in note for note in hidream.notes)
        again = await service.generate(ImageRequest("generate", "x", model="hidream"))
    assert "response_format" not in emu.requests_to("/images/generations")[-1].json
    assert len(emu.requests_to("/images/generations")) == 3  # no second refusal
    assert any("taught" in w for w in again.warnings)


async def test_a_refused_field_the_caller_asked_for_is_an_error_naming_it(tmp_path: Path, started: Any) -> None:
    emu = started(OpenAIEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, provider="openai-compatible", key=SECRET_KEY)])
    request = ImageRequest("generate", "x", model=UNNAMED, extra={"moderation": "strict"})
    with pytest.raises(InvalidRequestError) as err:
        await run(settings, request)
    assert "moderation" in err.value.message and "low, auto" in err.value.message
    assert len(emu.requests_to("/images/generations")) == 1  # the caller's field: not retried
    # Remembered: the next call is refused here, naming what the model takes, and nothing is sent.
    with pytest.raises(InvalidRequestError, match="low, auto"):
        await run(settings, ImageRequest("generate", "x", model=UNNAMED, extra={"moderation": "strict"}))
    assert len(emu.requests_to("/images/generations")) == 1


async def test_n_above_what_the_gateway_takes_is_learned_and_split(tmp_path: Path, started: Any) -> None:
    class TakesFour(OpenAIEmulator):
        image_models: ClassVar[dict[str, ImageModel]] = {UNNAMED: replace(GPT_IMAGE_2_7_NOVA, max_n=4)}

    emu = started(TakesFour)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest("generate", "x", model=UNNAMED, n=6))
    assert len(result.images) == 6
    sent = [r.json["n"] for r in emu.requests_to("/images/generations")]
    assert sent[0] == 6 and sorted(sent[1:]) == [2, 4]


# --- relays ---------------------------------------------------------------------------------------


async def test_relay_forwarding_to_openai(tmp_path: Path, started: Any) -> None:
    emu = started(NexLLMEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        made = await service.generate(ImageRequest("generate", "x", model="gpt-image-2", n=2, knobs={"quality": "low"}))
        nothing = await service.generate(ImageRequest("generate", "x"))
        edit = await service.generate(
            ImageRequest(
                "edit",
                "x",
                model=UNNAMED,
                images=[input_image(png()), input_image(png())],
                mask=input_image(alpha_mask()),
            )
        )
    assert len(made.images) == 2 and nothing.model == "gpt-image-2" and len(edit.images) == 1
    assert refused(emu) == []
    first = emu.requests_to("/images/generations")[0].json
    assert first == {"model": "gpt-image-2", "prompt": "x", "n": 2, "quality": "low"}
    [sent_edit] = emu.requests_to("/images/edits")
    assert len(sent_edit.files["image[]"]) == 2 and "mask" in sent_edit.files


async def test_relay_without_a_channel_is_model_not_found_and_not_retried(tmp_path: Path, started: Any) -> None:
    emu = started(NexLLMEmulator)
    ep = endpoint_for(emu, key=SECRET_KEY, models=["gpt-image-2", "gpt-image-9"])
    settings = make_settings(tmp_path, [ep])
    with pytest.raises(ModelNotFoundError) as err:
        await run(settings, ImageRequest("generate", "x", model="gpt-image-9"))
    assert "No available channel" in err.value.agent_text() and "'gpt-image-2'" in err.value.message
    assert len(emu.requests_to("/images/generations")) == 1


# --- corrections by configuration ------------------------------------------------------------------


async def test_model_overrides_correct_what_the_server_believes(tmp_path: Path, started: Any) -> None:
    class ServesAcme(OpenAIEmulator):
        image_models: ClassVar[dict[str, ImageModel]] = {
            "acme-diffusion-9": replace(GPT_IMAGE_2, id="acme-diffusion-9", shutdown_date=None)
        }

    emu = started(ServesAcme)
    plain = make_settings(tmp_path, [endpoint_for(emu, name="relay", provider="openai-compatible", key=SECRET_KEY)])
    await run(plain, ImageRequest("generate", "x", model="acme-diffusion-9", n=3))
    assert [r.json.get("n") for r in emu.requests_to("/images/generations")] == [1, 1, 1]  # nothing known: split

    overrides = {"acme-diffusion-9": {"family": "gpt-image-2", "sizes": ["1024x1024", "auto"]}}
    fixed = make_settings(
        tmp_path,
        [endpoint_for(emu, name="relay", provider="openai-compatible", key=SECRET_KEY, model_overrides=overrides)],
    )
    result = await run(fixed, ImageRequest("generate", "x", model="acme-diffusion-9", n=3, knobs={"quality": "high"}))
    assert len(result.images) == 3
    assert emu.requests_to("/images/generations")[-1].json == {
        "model": "acme-diffusion-9",
        "prompt": "x",
        "n": 3,
        "quality": "high",
    }
    with pytest.raises(InvalidRequestError, match="allowed sizes: 1024x1024, auto"):
        await run(fixed, ImageRequest("generate", "x", model="acme-diffusion-9", size="1536x1024"))
    async with ImageService(fixed) as service:
        [info] = [m for m in (await service.list_models(endpoint="relay"))[0] if m.id == "acme-diffusion-9"]
    assert info.family == "gpt-image-2" and info.facts["sizes"] == "configured" and info.source == "configured"


async def test_extra_null_removes_a_field(tmp_path: Path, started: Any) -> None:
    emu = started(NanoGptEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    await run(settings, ImageRequest("generate", "x", model="hidream", extra={"response_format": None, "size": None}))
    sent = emu.requests_to("/images/generations")[0].json
    assert "response_format" not in sent and "size" not in sent and sent["model"] == "hidream"


# --- size rules and discovery merge ---------------------------------------------------------------------


async def test_gpt_image_2_size_rules(tmp_path: Path, started: Any) -> None:
    emu = started(OpenAIEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    ok = await run(settings, ImageRequest("generate", "x", model="gpt-image-2", size="2048x1152"))
    assert (ok.images[0].width, ok.images[0].height) == (2048, 1152)
    for size, rule in [("1000x1000", "multiples of 16"), ("4096x1024", "at most 3840"), ("512x512", "655,360")]:
        with pytest.raises(InvalidRequestError, match=rule):
            await run(settings, ImageRequest("generate", "x", model="gpt-image-2", size=size))
    assert len(emu.requests_to("/images/generations")) == 1


async def test_nano_gpt_discovery_merge_keeps_manifest_capabilities(tmp_path: Path, started: Any) -> None:
    emu = started(NanoGptEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, name="nano", key=SECRET_KEY)])
    async with ImageService(settings) as service:
        models, warnings = await service.list_models(endpoint="nano", refresh=True)
        listed = {m.id: m for m in models}
        assert warnings == []
        assert "multi_image" in listed["gpt-image-1"].capabilities
        assert "multi_image" in listed["flux-kontext"].capabilities
        assert listed["hidream"].facts["capabilities"] == "manifest"
        two = [input_image(png(64, 64)), input_image(png(64, 64))]
        result = await service.generate(ImageRequest("edit", "merge", model="flux-kontext", images=two))
    assert len(result.images) == 1
    assert len(emu.requests_to("/images/generations")[0].json["imageDataUrls"]) == 2
    assert json.dumps(listed["hidream"].model_dump())  # the listing serializes as list_models returns it


@pytest.mark.parametrize(
    ("cls", "model", "size"),
    [
        (AiNebulaEmulator, "gemini-3.5-flash-image-preview", None),  # no model list: known by family
        (LlmVinEmulator, "flux-2.5-pro", "1536x1024"),
        (ModelmaxEmulator, "seedream-5.0-lite", "2K"),
        (NanoGptEmulator, "seedream-5.0", "2K"),  # in the gateway's list, in no manifest
    ],
)
async def test_each_gateways_unnamed_model_works_on_the_first_call(
    tmp_path: Path, started: Any, cls: type, model: str, size: str | None
) -> None:
    emu = started(cls)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    result = await run(settings, ImageRequest("generate", "a lighthouse", model=model, size=size))
    assert result.model == model and len(result.images) == 1
    assert refused(emu) == []
    [sent] = emu.requests_to("/images/generations")
    assert sent.json["model"] == model


# --- through the MCP surface ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_mcp_list_models_shows_provenance_and_extra_null_reaches_the_wire(
    tmp_path: Path, started: Any, mode: str
) -> None:
    from mcp.client import Client
    from mcp_types import TextContent

    from mcp_imagegen.server import build_server

    emu = started(OpenAIEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with Client(build_server(settings), mode=mode) as client:
        listed = await client.call_tool("list_models", {})
        assert not listed.is_error
        models = {m["id"]: m for m in listed.structured_content["models"]}
        nova = models[UNNAMED]  # in the gateway's list, in no manifest: its family fills it in
        assert nova["family"] == "gpt-image-2.5" and nova["facts"]["capabilities"] == "family"
        assert set(nova["capabilities"]) == {"generate", "edit", "mask", "multi_image"}
        assert "multiples of 16" in nova["size_rules"]
        listing = "\n".join(b.text for b in listed.content if isinstance(b, TextContent))
        assert "multiples of 16" in listing  # the text table an agent reads says the same
        assert "gpt-image-2 on openai: gpt-image-2 is deprecated and shuts down on 2027-03-02" in listing
        made = await client.call_tool(
            "generate_image", {"prompt": "x", "model": UNNAMED, "n": 2, "extra": {"n": None, "user": "u1"}}
        )
        text = "\n".join(b.text for b in made.content if isinstance(b, TextContent))
        assert not made.is_error, text
    sent = emu.requests_to("/images/generations")
    assert len(sent) == 2 and all("n" not in r.json and r.json["user"] == "u1" for r in sent)


async def test_a_model_released_after_the_list_was_read_is_found(
    tmp_path: Path, started: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mcp_imagegen import catalog

    monkeypatch.setattr(catalog, "RELIST_AFTER_S", 0.0)  # the list is "old" at once
    emu = started(OpenAIEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    released = "gpt-image-2.8-aurora"
    async with ImageService(settings) as service:
        models, _ = await service.list_models()
        assert released not in {m.id for m in models}
        emu.image_models = {**emu.image_models, released: replace(GPT_IMAGE_2_7_NOVA, id=released)}
        result = await service.generate(ImageRequest("generate", "x", model=released))
    assert result.model == released and refused(emu) == []


async def test_a_shut_down_model_on_a_gateway_without_a_list_is_sent_once(tmp_path: Path, started: Any) -> None:
    emu = started(ModelmaxEmulator)  # Google discontinued imagen-3; modelmax has no model list to ask
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        for _ in range(2):
            with pytest.raises(ModelNotFoundError) as err:
                await service.generate(ImageRequest("generate", "x", model="imagen-3"))
            assert "'seedream-5.0-lite'" in err.value.message  # names the one that works
        result = await service.generate(ImageRequest("generate", "x"))
    assert result.model == "seedream-5.0-lite"
    assert [r.json["model"] for r in emu.requests_to("/images/generations")] == ["imagen-3", "seedream-5.0-lite"]


# --- beliefs kept between calls ---------------------------------------------------------------------
# The catalog keeps each model's resolved belief between calls; whatever changes a belief must be
# seen by the next call of the same server.


class DatesALaterShutdown(OpenAIEmulator):
    """OpenAI whose model list can start giving a listed model a shutdown date."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.dated: dict[str, str] = {}

    def listed_models(self) -> list[dict[str, Any]]:
        out = super().listed_models()
        return [{**m, "shutdown_date": self.dated[m["id"]]} if m["id"] in self.dated else m for m in out]


async def test_a_refreshed_model_list_is_seen_by_the_next_call(tmp_path: Path, started: Any) -> None:
    emu = started(DatesALaterShutdown)
    settings = make_settings(tmp_path, [endpoint_for(emu, key=SECRET_KEY)])
    async with ImageService(settings) as service:
        first = await service.generate(ImageRequest("generate", "x", model=UNNAMED))
        assert first.model == UNNAMED
        emu.dated[UNNAMED] = "2026-01-01"  # shut down since the list was read
        await service.list_models(refresh=True)
        with pytest.raises(ModelNotFoundError, match="shut down"):
            await service.generate(ImageRequest("generate", "x", model=UNNAMED))
    assert len(emu.requests_to("/images/generations")) == 1  # refused before anything was sent


async def test_a_lesson_is_applied_by_the_next_call_of_the_same_server(tmp_path: Path, started: Any) -> None:
    emu = started(NanoGptEmulator)
    settings = make_settings(tmp_path, [endpoint_for(emu, name="nano", key=SECRET_KEY)])
    async with ImageService(settings) as service:
        before = await service.generate(ImageRequest("generate", "x", model="hidream"))
        assert not any("taught" in w for w in before.warnings)
        refusal = {"error": {"message": "Unknown parameter: 'response_format'", "type": "invalid_request_error"}}
        emu.inject(Fault.http(400, body=refusal), times=1, path="/images/generations")
        await service.generate(ImageRequest("generate", "x", model="hidream"))
        after = await service.generate(ImageRequest("generate", "x", model="hidream"))
    sent = [r.json for r in emu.requests_to("/images/generations")]
    assert [("response_format" in body) for body in sent] == [True, True, False, False]
    assert any("taught" in w and "response_format" in w for w in after.warnings)
