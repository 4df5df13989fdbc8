"""
The web chat page in a real headless browser (Playwright driving Debian's chromium) against the
real server and a tiny model that has memorised two conversations (see test_chat_web.py): one
whose reply is an HTML/JS injection attempt, one with a calculator tool call.
On failure a screenshot is saved and its path printed.
"""
import contextlib
import shutil

import pytest

from test_chat_web import TOOL_QUESTION, XSS_QUESTION, XSS_REPLY, Server, build_checkpoint

CHROMIUM = shutil.which("chromium")
pytestmark = [pytest.mark.slow,  # a server subprocess and a browser: ~30 s on 2 busy cores
              pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")]

@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("nanochat_base")
    build_checkpoint(base)
    srv = Server(base)
    yield srv
    srv.stop()

@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()

@pytest.fixture
def page(browser, server):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.page_errors = []
    page.on("pageerror", lambda e: page.page_errors.append(str(e)))
    page.goto(server.url)
    page.wait_for_selector("#model option", state="attached")  # the model list came from /v1/models
    yield page
    page.close()

@contextlib.contextmanager
def screenshot_on_failure(page, path):
    try:
        yield
    except BaseException:
        page.screenshot(path=str(path), full_page=True)
        print(f"\nscreenshot of the failing page: {path}")
        raise

def set_range(page, selector, value):
    page.eval_on_selector(selector, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", str(value))

def throttle(page, bytes_per_second):
    """Emulate a slow download link in chromium (None: full speed again)."""
    if not hasattr(page, "cdp"):
        page.cdp = page.context.new_cdp_session(page)
        page.cdp.send("Network.enable")
    page.cdp.send("Network.emulateNetworkConditions", {"offline": False, "latency": 0, "uploadThroughput": -1,
                                                       "downloadThroughput": bytes_per_second or -1})

def wait_idle(page):
    page.wait_for_function("() => !document.body.classList.contains('generating')", timeout=60_000)

def messages(page):
    return page.eval_on_selector_all("#chat .message", "els => els.map(e => [e.classList[1], e.querySelector('.content') ? e.querySelector('.content').innerText : null])")

def test_chat_stream_regenerate_edit_and_safe_text(page, server, tmp_path):
    with screenshot_on_failure(page, tmp_path / "chat.png"):
        set_range(page, "#temperature", 0)  # greedy: the memorised replies come back exactly
        assert page.inner_text("#temperature-value") == "0"
        # record every length the streaming reply passes through, to see it arrive piece by piece
        page.evaluate("""() => {
            window.__lengths = [];
            new MutationObserver(() => {
                const c = document.querySelector('.message.assistant.streaming .content');
                if (c) window.__lengths.push(c.textContent.length);
            }).observe(document.getElementById('chat'), {childList: true, subtree: true, characterData: true});
        }""")
        # on loopback the whole reply can land in one read; a 20 KB/s link makes the pieces visible
        throttle(page, 20_000)
        page.fill("#input", XSS_QUESTION)
        page.press("#input", "Enter")
        wait_idle(page)
        throttle(page, None)
        lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
        assert len(set(lengths)) > 3 and lengths == sorted(lengths), f"the reply should stream in: {lengths}"
        assert messages(page) == [["user", XSS_QUESTION], ["assistant", XSS_REPLY]]
        # the reply's markup is text on the page, never elements
        assert page.locator("#chat img").count() == 0 and page.locator("#chat b").count() == 0
        assert page.title() != "pwned"
        assert page.input_value("#input") == ""

        served = server.stats()["requests_served"]
        page.click(".message.assistant .regenerate")
        wait_idle(page)
        assert server.stats()["requests_served"] == served + 1
        assert messages(page) == [["user", XSS_QUESTION], ["assistant", XSS_REPLY]]

        page.click(".message.user .edit")
        page.fill(".edit-box textarea", TOOL_QUESTION)
        page.click(".edit-box .save-edit")
        wait_idle(page)
        # the edited question replaced the old one, the old answer is gone, the tool call shows as a chip
        assert messages(page) == [["user", TOOL_QUESTION], ["assistant", "sure: 6*7 = 42 so it is 42."]]
        assert page.inner_text(".message.assistant .tool") == "6*7 = 42"

        page.fill("#input", XSS_QUESTION)
        page.click("#send")
        wait_idle(page)
        assert [role for role, _ in messages(page)] == ["user", "assistant", "user", "assistant"]
        assert page.page_errors == []

        page.click("#new-chat")
        assert page.locator("#chat .message").count() == 0 and page.locator("#chat .empty").count() == 1

def test_stop_button_aborts_a_streaming_reply(page, server, tmp_path):
    with screenshot_on_failure(page, tmp_path / "stop.png"):
        set_range(page, "#temperature", 0)
        # a slow link (2 KB/s): the reply trickles in and there is time to press Stop mid-stream
        throttle(page, 2000)
        page.fill("#input", XSS_QUESTION)
        page.press("#input", "Enter")
        page.wait_for_function("() => document.querySelector('.message.assistant.streaming .content')?.textContent.length > 0",
                               timeout=30_000)
        assert page.is_visible("#stop") and not page.is_visible("#send")
        page.click("#stop")
        wait_idle(page)
        partial = messages(page)[-1]
        assert partial[0] == "assistant" and 0 < len(partial[1]) < len(XSS_REPLY)
        assert XSS_REPLY.startswith(partial[1])
        assert page.is_visible(".stopped-note") and page.is_visible("#send")
        throttle(page, None)
        # regenerate the stopped reply in full
        page.click(".message.assistant .regenerate")
        wait_idle(page)
        assert messages(page) == [["user", XSS_QUESTION], ["assistant", XSS_REPLY]]

def test_bad_request_shows_an_error_and_the_page_recovers(page, tmp_path):
    with screenshot_on_failure(page, tmp_path / "error.png"):
        page.fill("#input", "x" * 9000)  # over the server's per-message limit
        page.press("#input", "Enter")
        wait_idle(page)
        assert page.locator(".message.error").count() == 1
        assert "characters" in page.inner_text(".message.error .content")
        set_range(page, "#temperature", 0)
        page.fill("#input", XSS_QUESTION)
        page.press("#input", "Enter")
        wait_idle(page)
        assert messages(page) == [["user", XSS_QUESTION], ["assistant", XSS_REPLY]]

def test_phone_width(browser, server, tmp_path):
    page = browser.new_page(viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True)
    try:
        page.goto(server.url)
        with screenshot_on_failure(page, tmp_path / "phone.png"):
            page.wait_for_selector("#model option", state="attached")
            set_range(page, "#temperature", 0)
            page.fill("#input", TOOL_QUESTION)
            page.tap("#send")
            wait_idle(page)
            assert messages(page)[-1] == ["assistant", "sure: 6*7 = 42 so it is 42."]
            # nothing wider than the screen, and the composer stays on screen
            assert page.evaluate("document.documentElement.scrollWidth") <= 375
            box = page.locator("#send").bounding_box()
            assert box["x"] + box["width"] <= 375 and box["y"] + box["height"] <= 700
            page.screenshot(path=str(tmp_path / "phone_ok.png"))
    finally:
        page.close()
