"""/console in a real browser (Debian's chromium, driven by Playwright) against a private stack:
gunicorn over real HTTP, a Celery worker and the emulator, so the jobs shown really ran.

The screenshots in docs/img/ are made here (`make screenshots`), so docs/console.md shows the
console as it is."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

from cli.listener import WebhookReceiver
from cli.stack import Stack, wait_until
from core.clients import ClientStore, NewClientCredentials
from service import create_app
from service.console import (
    CONTENT_SECURITY_POLICY,
    Bar,
    input_picture,
    page_size,
    spend_bars,
)
from service.console_session import SESSION_COOKIE, session_key
from tests.support.stack import served_stack

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
VIEWPORT = {"width": 1200, "height": 800}
# `make screenshots` sets this to docs/img; otherwise they go to a temporary folder, so that a
# test run leaves the checkout as it found it.
SCREENSHOTS_DIR_SETTING = "CONSOLE_SCREENSHOTS_DIR"
FINAL = {"succeeded", "failed", "cancelled", "expired"}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the pages' screenshots go: docs/img under `make screenshots`, else a temporary
    folder (they are taken either way: a page that cannot render fails here)."""
    chosen = os.environ.get(SCREENSHOTS_DIR_SETTING)
    folder = Path(chosen).resolve() if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


# --- what the pages show, as plain functions ----------------------------------------------------


def test_an_upload_ref_is_served_and_anything_else_is_a_link() -> None:
    upload_id = "upl_" + "ab" * 16
    assert input_picture("Input", f"upload:{upload_id}").upload_id == upload_id  # type: ignore[union-attr]
    linked = input_picture("Input", "https://images.example.com/a.png")
    assert linked is not None and linked.upload_id is None and linked.url
    assert input_picture("Input", "upload:../../etc").upload_id is None  # type: ignore[union-attr]
    assert input_picture("Input", None) is None


def test_spend_bars_scale_to_the_day_that_spent_most() -> None:
    bars = spend_bars(
        [
            {"date": "2026-12-01", "cost_usd": 0.0},
            {"date": "2026-12-02", "cost_usd": 2.0},
            {"date": "2026-12-03", "cost_usd": 1.0},
        ]
    )
    assert [b.height for b in bars] == [0, 200, 100]
    assert [b.y for b in bars] == [200, 0, 100]
    assert bars[1] == Bar("2026-12-02", 2.0, x=264.0, y=0, width=192.0, height=200)
    assert [b.height for b in spend_bars([{"date": "2026-12-01", "cost_usd": 0}])] == [0]


def test_a_page_size_stays_within_bounds() -> None:
    assert [page_size(v) for v in (None, "", "x", "-1", "0", "2", "1000")] == [
        20,
        20,
        20,
        20,
        1,
        2,
        100,
    ]


# --- in the browser -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def own_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with served_stack(tmp_path_factory.mktemp("console"), "console") as stack:
        yield stack


class Team:
    """A registered client using the API over HTTP, to make the jobs the console shows."""

    def __init__(self, stack: Stack, name: str) -> None:
        self.stack = stack
        with stack.redis() as client:
            self.creds: NewClientCredentials = ClientStore(client).create(name)
        self.headers = {"Authorization": f"Bearer {self.creds.api_key}"}
        self.refs: dict[str, str] = {}

    def upload_sample(self, name: str) -> str:
        """The emulator's sample picture `name` uploaded; its `upload:` ref."""
        if name not in self.refs:
            sample = requests.get(f"{self.stack.emulator_url}/samples/{name}", timeout=10)
            answer = requests.post(
                self.stack.api_url + "/v1/uploads",
                data=sample.content,
                headers=self.headers | {"Content-Type": "image/png"},
                timeout=10,
            )
            assert answer.status_code in (200, 201), answer.text
            self.refs[name] = answer.json()["ref"]
        return self.refs[name]

    def submit(self, prompt: str, **extra: Any) -> str:
        body = {
            "prompt": prompt,
            "image_url": self.upload_sample("image.png"),
            "mask_image_url": self.upload_sample("mask.png"),
            **extra,
        }
        answer = requests.post(
            self.stack.api_url + "/v1/jobs", json=body, headers=self.headers, timeout=10
        )
        assert answer.status_code == 202, answer.text
        job_id: str = answer.json()["id"]
        return job_id

    def job(self, job_id: str) -> dict[str, Any]:
        answer = requests.get(
            f"{self.stack.api_url}/v1/jobs/{job_id}", headers=self.headers, timeout=10
        )
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()
        return job

    def wait_status(self, job_id: str, statuses: set[str], timeout_s: float = 30) -> dict[str, Any]:
        return wait_until(
            lambda: (j := self.job(job_id))["status"] in statuses and j,
            timeout_s=timeout_s,
            what=f"job {job_id} in {statuses}",
        )


@pytest.fixture(scope="module")
def team(own_stack: Stack) -> Team:
    return Team(own_stack, "console-team")


@pytest.fixture(scope="module")
def webhooks(team: Team) -> Iterator[WebhookReceiver]:
    rx = WebhookReceiver(secret=team.creds.webhook_secret).start()
    yield rx
    rx.stop()


@pytest.fixture(scope="module")
def finished_jobs(team: Team, webhooks: WebhookReceiver) -> list[str]:
    """Three jobs that ran to success with a webhook, oldest first, and one that failed."""
    ids = [team.submit(f"a red sky at dusk, take {n}", webhook_url=webhooks.url) for n in range(3)]
    for job_id in ids:
        assert team.wait_status(job_id, FINAL)["status"] == "succeeded"
    failed = team.submit("[emulator:fail]")
    assert team.wait_status(failed, FINAL)["status"] == "failed"
    return [*ids, failed]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run installs it)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) per test."""
    opened = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    yield opened
    opened.close()


def sign_in(page: Page, stack: Stack, api_key: str) -> None:
    page.goto(stack.api_url + "/console/sign-in")
    page.fill("#api_key", api_key)
    page.click("form.sign-in button[type=submit]")


@pytest.fixture
def page(context: BrowserContext, own_stack: Stack, team: Team) -> Page:
    """A page of a browser signed in as `team`."""
    opened = context.new_page()
    sign_in(opened, own_stack, team.creds.api_key)
    assert opened.url == own_stack.api_url + "/console/jobs"
    return opened


def test_a_wrong_key_is_refused_and_the_right_one_signs_in_with_a_guarded_cookie(
    context: BrowserContext, own_stack: Stack, team: Team
) -> None:
    page = context.new_page()
    sign_in(page, own_stack, "igw_not-a-key")
    assert page.url.endswith("/console/sign-in")
    assert "not valid" in page.locator("p.error").inner_text()

    response = page.goto(own_stack.api_url + "/console/jobs")
    assert response is not None and page.url.endswith("/console/sign-in")  # not signed in yet

    sign_in(page, own_stack, team.creds.api_key)
    assert page.url.endswith("/console/jobs")
    [cookie] = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Lax"
    assert cookie["path"] == "/console"
    assert team.creds.api_key not in cookie["value"]
    with own_stack.redis() as client:
        record = client.get(session_key(cookie["value"]))
        assert record is not None and team.creds.api_key not in str(record)
        assert 0 < client.ttl(session_key(cookie["value"])) <= 8 * 3600
    assert team.creds.api_key not in page.content()
    answer = page.goto(own_stack.api_url + "/console/jobs")
    assert answer is not None
    assert answer.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert answer.headers["cache-control"] == "no-store"


def test_the_jobs_list_is_newest_first_filters_by_status_and_pages(
    page: Page, own_stack: Stack, finished_jobs: list[str], screenshots: Path
) -> None:
    *succeeded, failed = finished_jobs
    rows = page.locator("table.jobs tbody tr")
    listed = [rows.nth(n).locator("td").first.inner_text() for n in range(rows.count())]
    # Other tests' jobs may be newer (any order of tests): these four, newest first among them.
    assert [j for j in listed if j in finished_jobs] == [failed, *reversed(succeeded)]
    failed_row = rows.nth(listed.index(failed))
    assert failed_row.locator(".badge").inner_text() == "failed"
    succeeded_row = rows.nth(listed.index(succeeded[0]))
    assert "$" in succeeded_row.locator("td").nth(4).inner_text()  # a success has its cost
    page.screenshot(path=str(screenshots / "console-jobs.png"))

    page.select_option("#status", "succeeded")
    page.click("form.filter button[type=submit]")
    assert "status=succeeded" in page.url
    badges = page.locator("table.jobs .badge").all_inner_texts()
    assert badges and set(badges) == {"succeeded"}

    page.goto(own_stack.api_url + "/console/jobs?status=succeeded&limit=2")
    pages: list[list[str]] = []
    while True:
        pages.append(page.locator("table.jobs tbody tr td:first-child").all_inner_texts())
        if page.locator("a.next").count() == 0:
            break
        page.click("a.next")
        assert "cursor=" in page.url and "limit=2" in page.url and "status=succeeded" in page.url
    assert len(pages) >= 2 and all(1 <= len(rows) <= 2 for rows in pages[:-1]), pages
    every = [job_id for rows in pages for job_id in rows]
    assert len(every) == len(set(every))  # no job on two pages
    assert [j for j in every if j in succeeded] == list(reversed(succeeded))

    page.goto(own_stack.api_url + "/console/jobs?status=failed")
    page.locator("table.jobs tbody tr a", has_text=failed).click()
    assert page.url.endswith(f"/console/jobs/{failed}")
    assert page.locator("h1 .badge").inner_text() == "failed"
    assert page.locator("p.error").count() == 1  # why it failed, as the job's error says


def natural_widths(page: Page) -> dict[str, int]:
    """Each picture's alt text and naturalWidth (0: it did not load)."""
    widths: dict[str, int] = page.eval_on_selector_all(
        ".pictures img",
        "imgs => Object.fromEntries(imgs.map(i => [i.alt, i.complete ? i.naturalWidth : 0]))",
    )
    return widths


def test_a_job_page_shows_its_three_pictures_its_timeline_and_redelivers(
    page: Page,
    own_stack: Stack,
    team: Team,
    finished_jobs: list[str],
    webhooks: WebhookReceiver,
    screenshots: Path,
) -> None:
    job_id = finished_jobs[2]
    page.goto(f"{own_stack.api_url}/console/jobs/{job_id}")
    page.wait_for_load_state("load")
    widths = natural_widths(page)
    assert set(widths) == {"Input", "Mask", "Output 1"}, widths
    assert all(width > 0 for width in widths.values()), widths
    assert page.locator("img.mask").evaluate("m => getComputedStyle(m).mixBlendMode") == "screen"
    params = page.locator("table.params").inner_text()
    assert "a red sky at dusk, take 2" in params and "image_url" not in params
    steps = page.locator(".timeline .step").all_inner_texts()
    assert steps[:2] == ["created", "submitted"] and steps[-1] == "succeeded", steps
    page.screenshot(path=str(screenshots / "console-job.png"), full_page=False)

    attempts_before = page.locator("table.deliveries tbody tr").count()
    assert attempts_before >= 1
    delivered_before = len(webhooks.events)
    page.click("text=Redeliver the final event")
    assert "on its way again" in page.locator(".flash").inner_text()
    wait_until(lambda: len(webhooks.events) > delivered_before, what="the redelivery")

    def attempts_shown() -> int:
        page.reload()
        return page.locator("table.deliveries tbody tr").count()

    wait_until(lambda: attempts_shown() > attempts_before, what="the redelivery listed")


def test_a_job_under_way_is_cancelled_from_its_page(
    page: Page, own_stack: Stack, team: Team
) -> None:
    """Under way at RunComfy, still in its queue (the emulator, as RunComfy, cancels only
    then; a run already going completes and is paid)."""
    job_id = team.submit("[emulator:queue=30] a slow one")
    team.wait_status(job_id, {"submitted"})
    page.goto(f"{own_stack.api_url}/console/jobs/{job_id}")
    assert page.locator("h1 .badge").inner_text() == "submitted"
    page.click("text=Cancel job")
    assert "Cancel requested" in page.locator(".flash").inner_text()
    assert team.wait_status(job_id, FINAL)["status"] == "cancelled"
    page.reload()
    assert page.locator("h1 .badge").inner_text() == "cancelled"
    assert page.locator("text=Cancel job").count() == 0
    steps = page.locator(".timeline .step").all_inner_texts()
    assert steps == ["created", "submitted", "cancelled"], steps

    running = team.submit("[emulator:run=3] already running")
    team.wait_status(running, {"running"})
    page.goto(f"{own_stack.api_url}/console/jobs/{running}")
    page.click("text=Cancel job")
    assert "a run already going completes" in page.locator(".notice").inner_text()
    assert page.locator("text=Cancel job").count() == 0  # asked once; not offered again
    assert team.job(running)["cancel_requested"] is True


def test_a_form_posted_without_its_csrf_token_is_refused_and_does_nothing(
    page: Page, own_stack: Stack, team: Team
) -> None:
    job_id = team.submit("[emulator:queue=30] not to be cancelled")
    team.wait_status(job_id, {"submitted"})
    # The browser's own cookies (the session), a form body without csrf_token.
    url = f"{own_stack.api_url}/console/jobs/{job_id}/cancel"
    refused = page.request.post(url, form={"reason": "none"}, max_redirects=0)
    assert refused.status == 400
    assert "CSRF" in refused.text()
    forged = page.request.post(url, form={"csrf_token": "forged"}, max_redirects=0)
    assert forged.status == 400
    time.sleep(0.5)
    job = team.job(job_id)
    assert job["status"] == "submitted" and job["cancel_requested"] is False
    page.goto(f"{own_stack.api_url}/console/jobs/{job_id}")  # the form itself works
    page.click("text=Cancel job")
    assert team.wait_status(job_id, FINAL)["status"] == "cancelled"


def test_another_clients_job_and_pictures_are_a_404(
    page: Page, own_stack: Stack, team: Team
) -> None:
    other = Team(own_stack, "console-other")
    job_id = other.submit("someone else's")
    upload_id = other.upload_sample("image.png").removeprefix("upload:")
    mine = team.upload_sample("image.png").removeprefix("upload:")
    assert upload_id != mine  # the same bytes, another client: another id
    for path in (f"/console/jobs/{job_id}", f"/console/pictures/{upload_id}"):
        answer = page.goto(own_stack.api_url + path)
        assert answer is not None and answer.status == 404, path
    refused = page.request.post(own_stack.api_url + f"/console/jobs/{job_id}/cancel")
    assert refused.status in (400, 404)  # no token here: refused either way, nothing done
    assert other.job(job_id)["cancel_requested"] is False


def test_the_usage_page_charts_spend_per_day_with_totals_and_limits(
    page: Page, own_stack: Stack, finished_jobs: list[str], screenshots: Path
) -> None:
    page.click("header nav >> text=Usage")
    assert page.url.endswith("/console/usage")
    bars = page.locator("svg.chart rect.bar")
    today = time.gmtime()
    assert bars.count() >= 28
    heights = [float(bars.nth(n).get_attribute("height") or 0) for n in range(bars.count())]
    assert heights[today.tm_mday - 1] == 200  # today spent most: the jobs above
    totals = page.locator("table.totals").inner_text()
    assert re.search(r"succeeded\s+[3-9]", totals), totals
    assert "No budget set" in page.content()
    page.screenshot(path=str(screenshots / "console-usage.png"))


def test_the_cookie_is_secure_over_https_and_the_api_gets_no_session(own_stack: Stack) -> None:
    app = create_app({"TESTING": True, "SETTINGS": own_stack.settings()})
    try:
        browser_like = app.test_client()
        over_https = browser_like.get("/console/sign-in", base_url="https://gw.example")
        over_http = browser_like.get("/console/sign-in", base_url="http://gw.example")
        api = browser_like.get("/v1/usage", base_url="https://gw.example")
    finally:
        app.extensions["inpaint_gateway"].redis.close()
    [secure] = over_https.headers.getlist("Set-Cookie")
    assert secure.startswith(SESSION_COOKIE + "=") and "; Secure" in secure
    assert "; HttpOnly" in secure and "; SameSite=Lax" in secure and "; Path=/console" in secure
    [plain] = over_http.headers.getlist("Set-Cookie")
    assert "Secure" not in plain
    assert api.status_code == 401 and "Set-Cookie" not in api.headers


def test_sign_out_ends_the_session_and_a_revoked_key_signs_the_browser_out(
    page: Page, context: BrowserContext, own_stack: Stack, browser: Browser
) -> None:
    [cookie] = [c for c in context.cookies() if c["name"] == SESSION_COOKIE]
    page.click("header button[type=submit]")  # Sign out
    assert page.url.endswith("/console/sign-in")
    with own_stack.redis() as client:
        assert client.get(session_key(cookie["value"])) is None
    page.goto(own_stack.api_url + "/console/jobs")
    assert page.url.endswith("/console/sign-in")

    doomed = Team(own_stack, "console-revoked")
    second = browser.new_context(viewport=VIEWPORT)  # type: ignore[arg-type]
    try:
        tab = second.new_page()
        sign_in(tab, own_stack, doomed.creds.api_key)
        assert tab.url.endswith("/console/jobs")
        with own_stack.redis() as client:
            assert ClientStore(client).revoke(doomed.creds.client_id)
        time.sleep(0.6)  # RecentKeys.CACHE_S: the sign-in's own check may still be cached
        tab.goto(own_stack.api_url + "/console/usage")
        assert tab.url.endswith("/console/sign-in")
        assert "no longer works" in tab.locator(".flash").inner_text()
    finally:
        second.close()
