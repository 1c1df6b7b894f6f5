"""What the real-Chromium tests share: launching Debian's Chromium through Playwright (never a
downloaded browser) and logging a person into the ranking UI."""

from __future__ import annotations

from collections.abc import Iterator

from tests.test_ui_browser import CHROMIUM, CHROMIUM_ARGS

WAIT_MS = 120_000  # generous: 2 CPU cores shared by serve, learn, ui, redis and the browser


def launch() -> Iterator:
    """A headless Chromium for a module-scoped fixture (``yield from launch()``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def logged_in(browser, ui_url: str, user: str, password: str):
    """A fresh browser context (its own session) logged into the UI as ``user``."""
    page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
    page.set_default_timeout(WAIT_MS)
    page.goto(ui_url)
    page.locator("input[type=text]").first.fill(user)
    page.locator("input[type=password]").first.fill(password)
    page.get_by_role("button", name="Login").click()
    return page
