"""The playground (edge/handlers/playground.py, edge/playground/): its files served with a strict
Content-Security-Policy, and the pages driven in a real browser — headless Chromium from
Debian's packages, through Playwright — against the mesh: sign in, generate an image and see
it, stream a chat answer, run a song with its progress bar to the end, upscale an upload, sign
out. Screenshots of every page go to the test's tmp folder and to tests/artifacts/playground/
(git-ignored) for review."""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from edge.handlers.playground import ASSETS, CONTENT_SECURITY_POLICY
from services.billing.sessions import Sessions
from tests.conftest import Mesh, new_customer

pytestmark = pytest.mark.parametrize("mesh", ["sqlite"], indirect=True)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "playground"
PASSWORD = "playground password"
SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
#: Every page of the nav (edge/playground/pages.js), by its fragment.
PAGES = ("image", "chat", "music", "segment", "upscale", "speech", "clone", "video")


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is not installed (Debian's chromium package: apt-get install chromium)"
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (the test extra: pip install -e '.[test]')"
    return None


async def test_the_page_and_its_assets_are_served_with_a_strict_policy(
    mesh: Mesh, http: aiohttp.ClientSession
) -> None:
    async with http.get(mesh.url + "/") as response:
        assert response.status == 200 and response.content_type == "text/html"
        page = await response.text()
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert "default-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe" not in CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert 'src="/playground/app.js"' in page
    assert "http://" not in page and "https://" not in page  # nothing from another origin
    kinds = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".svg": "image/svg+xml"}
    for file in sorted(ASSETS.iterdir()):
        async with http.get(f"{mesh.url}/playground/{file.name}") as response:
            assert response.status == 200, file.name
            assert response.content_type == kinds[file.suffix] and response.charset == "utf-8"
            text = await response.text()
        assert "//cdn" not in text and "https://" not in text, file.name  # vendored, works offline
    for name in ("nope.js", "..%2Fhandlers%2Fplayground.py", "%2E%2E%2Fapp.py", ".hidden.js", "APP.JS"):
        async with http.get(f"{mesh.url}/playground/{name}") as response:
            assert response.status == 404, name
            assert (await response.json())["error"]["type"] == "not_found_error"


@pytest.fixture
async def signed_up(mesh: Mesh) -> AsyncIterator[tuple[str, str]]:
    """A premium account (chat is premium-only) with credits and a user: (account id, user name)."""
    customer = await new_customer(mesh, "50", premium=True)
    name = f"play-{customer.account_id[-8:]}".lower()
    await Sessions(mesh.ledger).create_user(customer.account_id, name, PASSWORD)
    yield customer.account_id, name


def _png(width: int = 32, height: int = 32) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (200, 90, 40)).save(out, "PNG")
    return out.getvalue()


async def test_the_playground_in_chromium(mesh: Mesh, signed_up: tuple[str, str], tmp_path: Path) -> None:
    if (reason := _browser_missing()) is not None:
        pytest.skip(reason)
    from playwright.async_api import async_playwright, expect

    _, user = signed_up
    shots = tmp_path / "screenshots"
    shots.mkdir()
    problems: list[str] = []

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(90_000)
            expect.set_options(timeout=90_000)
            page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
            page.on(
                "console",
                lambda message: problems.append(message.text) if message.type == "error" else None,
            )

            async def shot(name: str) -> None:
                await page.screenshot(path=str(shots / f"{name}.png"), full_page=True)

            # Sign in: the form first, then the layout with the user and balance.
            await page.goto(mesh.url + "/")
            await expect(page.locator("#sign-in")).to_be_visible()
            await shot("00-sign-in")
            await page.fill("input[name=name]", user)
            await page.fill("input[name=password]", PASSWORD)
            await page.click("#sign-in-form button[type=submit]")
            await expect(page.locator("#user")).to_have_text(user)
            await expect(page.get_by_test_id("balance")).to_have_text("50 (premium)")
            assert await page.locator("nav a").evaluate_all(
                "links => links.map(a => a.dataset.page)"
            ) == list(PAGES)
            # The session cookie is HttpOnly and nothing is kept in storage: no key in the page.
            assert await page.evaluate("document.cookie") == ""
            assert await page.evaluate("localStorage.length + sessionStorage.length") == 0

            # Images: the price (a dry run) before Run, then the image inline with its timing.
            await page.goto(mesh.url + "/#/image")
            await page.fill("#f-prompt", "a red fox in the snow")
            await page.select_option("#f-size", "512x512")
            await page.fill("#f-seed", "7")
            await expect(page.get_by_test_id("price")).to_have_text(re.compile(r"^Price: [0-9.]+ credits$"))
            await expect(page.get_by_test_id("run")).to_be_enabled()
            await page.get_by_test_id("run").click()
            image = page.get_by_test_id("result").locator("img")
            await expect(image).to_be_visible()
            assert await image.evaluate("img => img.complete && img.naturalWidth") == 512
            await expect(page.get_by_test_id("timing-table")).to_contain_text("inference")
            await expect(page.get_by_test_id("result")).to_contain_text("Seed 7")
            await shot("01-image")

            # Chat: a streamed answer.
            await page.goto(mesh.url + "/#/chat")
            await expect(page.locator("#f-model option")).not_to_have_count(0)
            await page.select_option("#f-model", SMOL)
            await page.fill("#f-max_tokens", "8")
            await page.fill("#f-temperature", "0")
            await page.fill("#f-message", "Name a colour.")
            await expect(page.get_by_test_id("run")).to_be_enabled()
            await page.get_by_test_id("run").click()
            await expect(page.get_by_test_id("status")).to_have_attribute("data-done", "true")
            answer = await page.get_by_test_id("assistant").text_content()
            assert answer and answer.strip(), "no streamed answer"
            await expect(page.get_by_test_id("status")).to_contain_text("completion tokens")
            await shot("02-chat")

            # Music: progress events drive the bar to its end, then the song plays inline.
            await page.goto(mesh.url + "/#/music")
            await page.fill("#f-prompt", "calm piano")
            await page.fill("#f-duration", "1")
            await page.fill("#f-num_inference_steps", "3")
            await page.fill("#f-seed", "42")
            await expect(page.get_by_test_id("run")).to_be_enabled()
            await page.get_by_test_id("run").click()
            await expect(page.get_by_test_id("status")).to_have_attribute("data-done", "true")
            bar = page.get_by_test_id("progress")
            assert await bar.evaluate("bar => [bar.value, bar.max]") == [3, 3]  # fed by 3 progress events
            audio = page.get_by_test_id("result").locator("audio")
            await expect(audio).to_have_count(1)
            duration = await audio.evaluate(
                "a => new Promise(done => a.readyState >= 1 ? done(a.duration)"
                " : a.addEventListener('loadedmetadata', () => done(a.duration)))"
            )
            assert duration == pytest.approx(1.0, abs=0.1)
            await expect(page.get_by_test_id("timing-table")).to_contain_text("total")
            await shot("03-music")

            # Upscale: a file upload sent as a data: URL, the larger image shown.
            await page.goto(mesh.url + "/#/upscale")
            await page.set_input_files(
                "#f-image", files=[{"name": "small.png", "mimeType": "image/png", "buffer": _png()}]
            )
            await page.select_option("#f-method", "lanczos")
            await page.fill("#f-scale", "2")
            await expect(page.get_by_test_id("run")).to_be_enabled()
            await page.get_by_test_id("run").click()
            upscaled = page.get_by_test_id("result").locator("img")
            await expect(upscaled).to_be_visible()
            assert await upscaled.evaluate("img => img.complete && img.naturalWidth") == 64
            await shot("04-upscale")

            # Every other page renders its form (a screenshot each for review).
            for number, name in enumerate(("segment", "speech", "clone", "video"), start=5):
                await page.goto(f"{mesh.url}/#/{name}")
                await expect(page.get_by_test_id("form")).to_be_visible()
                await expect(page.locator(f"nav a[data-page={name}]")).to_have_attribute(
                    "aria-current", "page"
                )
                await shot(f"{number:02d}-{name}")

            # Sign out: back to the form, and the cookie no longer works.
            await page.click("#sign-out")
            await expect(page.locator("#sign-in")).to_be_visible()
            assert await page.evaluate("fetch('/v1/account').then(r => r.status)") == 401
            await shot("09-signed-out")
        finally:
            await browser.close()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    for file in shots.iterdir():
        shutil.copy(file, ARTIFACTS / file.name)
    # The expected 401 of the last fetch is logged by the browser; nothing else may be.
    unexpected = [p for p in problems if "401" not in p]
    assert not unexpected, unexpected
