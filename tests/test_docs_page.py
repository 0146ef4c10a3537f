"""/docs in a real browser (Debian's chromium, driven by Playwright) with every request to a host
other than the app's refused: Swagger UI still renders the operations, from the app's assets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
import requests
from playwright.sync_api import Route, sync_playwright

from cli.stack import Stack
from service.docs import SWAGGER_UI_ASSETS_PATH
from tests.fuzzing import LiveApi, live_api

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS_DB = 7  # a database of the stack's redis-server that no worker reads
LOCAL_HOSTS = {"127.0.0.1"}


@pytest.fixture(scope="module")
def api(stack: Stack) -> Iterator[LiveApi]:
    with live_api(stack.redis_server.url.rsplit("/", 1)[0] + f"/{DOCS_DB}") as running:
        yield running


def test_docs_render_every_operation_with_no_request_leaving_the_host(api: LiveApi) -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    asked: list[str] = []
    refused: list[str] = []

    def only_local(route: Route) -> None:
        url = route.request.url
        asked.append(url)
        parts = urlsplit(url)
        if parts.scheme in {"data", "blob"} or parts.hostname in LOCAL_HOSTS:
            route.continue_()
        else:  # refused, as it would be without the internet, and remembered
            refused.append(url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            page = browser.new_page()
            page.route("**/*", only_local)
            page.goto(f"{api.base_url}/docs")
            create = page.locator("#operations-jobs-createJob")
            create.wait_for(state="visible", timeout=30_000)
            assert "/v1/jobs" in create.inner_text()
            for operation in ("listJobs", "getJob", "cancelJob", "getJobDeliveries"):
                assert page.locator(f"#operations-jobs-{operation}").is_visible(), operation
            assert page.get_by_text("Unable to render this definition").count() == 0
            title = page.locator(".information-container .title").inner_text()
            assert "inpaint-gateway" in title
        finally:
            browser.close()
    assert refused == [], refused
    loaded = {urlsplit(url).path for url in asked}
    assert {
        f"{SWAGGER_UI_ASSETS_PATH}swagger-ui-bundle.js",
        f"{SWAGGER_UI_ASSETS_PATH}swagger-ui.css",
        "/openapi.json",
    } <= loaded, loaded


def test_the_docs_assets_are_the_pinned_files_and_nothing_else(api: LiveApi) -> None:
    bundle = requests.get(f"{api.base_url}{SWAGGER_UI_ASSETS_PATH}swagger-ui-bundle.js", timeout=10)
    assert bundle.status_code == 200 and len(bundle.content) > 500_000
    assert "javascript" in bundle.headers["Content-Type"]
    assert "max-age" in bundle.headers.get("Cache-Control", "")
    for other in ("VERSION", "LICENSE", "..%2F__init__.py", "oauth2-redirect.html"):
        answer = requests.get(f"{api.base_url}{SWAGGER_UI_ASSETS_PATH}{other}", timeout=10)
        assert answer.status_code == 404, other
