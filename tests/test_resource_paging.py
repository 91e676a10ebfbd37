"""resources/list pages through every saved image with opaque cursors, stable under new saves."""

from __future__ import annotations

from pathlib import Path

import pytest
from mcp.client import Client
from mcp.shared.exceptions import MCPError

from mcp_imagegen.config import EndpointConfig, Settings
from mcp_imagegen.errors import InvalidRequestError
from mcp_imagegen.server import RECENT_URI, RESOURCE_PAGE_SIZE, build_server
from mcp_imagegen.store import ImageStore
from tests.test_store import save

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def filled_store(output_dir: Path, count: int) -> tuple[ImageStore, list[str]]:
    st = ImageStore(output_dir)
    return st, [save(st, prompt=f"image {i}").id for i in range(count)]


def test_store_pages_cover_every_record_once_newest_first(tmp_path: Path) -> None:
    st, ids = filled_store(tmp_path, 25)
    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        records, cursor = st.page(cursor, 10)
        pages += 1
        assert len(records) <= 10
        seen += [r.id for r in records]
        if pages == 2:
            # Saved between pages: it sorts before everything handed out, so nothing repeats or goes missing.
            late = save(st, prompt="saved while paging").id
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    assert pages == 3
    assert st.page(None, 10)[0][0].id == late


def test_store_refuses_a_cursor_it_did_not_make(tmp_path: Path) -> None:
    st, _ = filled_store(tmp_path, 2)
    for bad in ("nonsense", "", "MTIzOmZvbw", "%%%"):
        with pytest.raises(InvalidRequestError) as err:
            st.page(bad, 10)
        assert "nextCursor" in str(err.value)


def test_a_full_last_page_has_no_cursor(tmp_path: Path) -> None:
    st, ids = filled_store(tmp_path, 4)
    first, cursor = st.page(None, 2)
    second, cursor = st.page(cursor, 2)
    assert [r.id for r in first + second] == list(reversed(ids)) and cursor is None


@pytest.mark.parametrize("mode", ["auto", "legacy"])
async def test_resources_list_pages_through_250_images(tmp_path: Path, mode: str) -> None:
    settings = Settings(output_dir=tmp_path / "out", endpoints=[EndpointConfig(name="offline", provider="offline")])
    st, ids = filled_store(settings.output_dir, 250)
    async with Client(build_server(settings), mode=mode, cache=None) as client:
        listed: list[str] = []
        fixed: list[str] = []
        cursor: str | None = None
        pages = 0
        while True:
            page = await client.list_resources(cursor=cursor)
            pages += 1
            uris = [str(r.uri) for r in page.resources]
            listed += [u.rsplit("/", 1)[-1] for u in uris if u.startswith("imagegen://images/")]
            fixed += [u for u in uris if not u.startswith("imagegen://images/")]
            assert len([u for u in uris if u.startswith("imagegen://images/")]) <= RESOURCE_PAGE_SIZE
            if pages == 1:
                save(st, prompt="saved while the client pages")
            cursor = page.next_cursor
            if cursor is None:
                break
        assert sorted(listed) == sorted(ids) and len(listed) == len(set(listed)) == 250
        assert listed == list(reversed(ids))  # newest first
        assert fixed == [RECENT_URI]  # the fixed resources once, on the first page
        assert pages == 3

        with pytest.raises(MCPError) as err:
            await client.list_resources(cursor="not-a-cursor")
        assert err.value.code == -32602 and "nextCursor" in err.value.message
