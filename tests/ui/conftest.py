"""Fixtures for the UI tests: ``dagster dev`` on the demo's instance, and headless Debian Chromium."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from assets.instance import InstanceSettings, ensure_instance
from tests.ui.dagster_dev import DagsterDev, start_dagster_dev

CHROMIUM = Path("/usr/bin/chromium")
# Playwright must not download a browser (no network): it drives Debian's Chromium. As root it needs
# --no-sandbox; the background-networking flags stop it from dialling Google services that cannot be reached.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def dagster_ui(demo_home, tmp_path_factory) -> Iterator[DagsterDev]:
    """``dagster dev`` (webserver + daemon) on the demo's DAGSTER_HOME, with the GPU pool limited to 1."""
    # sqlite, telemetry off, the gpu pool limited to one step at a time (whatever CASTLORA_* says).
    ensure_instance(demo_home.dagster_home, InstanceSettings(gpu_slots=1))
    log = tmp_path_factory.mktemp("dagster_dev") / "dagster_dev.log"
    server = start_dagster_dev(demo_home.dagster_home, demo_home.data_home, log)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install chromium (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@contextmanager
def open_page(browser, url: str) -> Iterator[Page]:
    """A fresh browser page on the UI at ``url``, past the first-visit welcome modal."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    context.set_default_timeout(30_000)
    page = context.new_page()
    # A fresh instance greets the first visitor with a "Join the Dagster community" modal a moment after the
    # first page loads; skip it before the test clicks anything (it would close open menus), as a user would.
    welcome = page.get_by_text("Join the Dagster community")
    page.goto(f"{url}/overview")
    try:
        welcome.wait_for(timeout=15_000)
        page.get_by_role("button", name="Skip").click()
    except PlaywrightTimeoutError:
        pass  # already dismissed on this instance
    page.add_locator_handler(welcome, lambda: page.get_by_role("button", name="Skip").click())
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser, dagster_ui):
    with open_page(browser, dagster_ui.url) as opened:
        yield opened


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where screenshots go: $CASTLORA_UI_SCREENSHOTS (e.g. a CI artifact folder), else a pytest tmp dir."""
    chosen = os.environ.get("CASTLORA_UI_SCREENSHOTS")
    folder = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
