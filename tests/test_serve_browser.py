"""The page as a person uses it, in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which
``./run`` installs with apt; no browser is ever downloaded): typing a prompt shows images, changing it
changes them, drawing on the sketch changes the image-to-image result, moving a LoRA slider changes the
output, latency and images/s are shown; a pixel model gets a label picker. A page of another origin cannot use
the server's WebSocket while its own page can; the page shows a pending request, checks the seed, retries after
"server busy", resets the sketch toggle on clear, keeps guidance at 1 or more, has a favicon and breaks nothing
of its own Content-Security-Policy. The screenshot is written to
``$FEWSTEP_SCREENSHOT`` when set (``bench/results/serve.png`` in the README is made that way)."""

import contextlib
import http.server
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from serve_helpers import MODELS, running_server

CHROMIUM, DRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
if not (CHROMIUM.exists() and DRIVER.exists()):
    pytest.skip("needs Debian's chromium and chromium-driver (./run installs them with apt)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--window-size=1100,820"]


@pytest.fixture
def browser():
    os.environ["SE_AVOID_STATS"] = "true"          # selenium: no usage statistics, nothing fetched
    profile = tempfile.mkdtemp(prefix="fewstep-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def shown(driver) -> list[str]:
    return [img.get_attribute("src") for img in driver.find_elements(By.CSS_SELECTOR, "#results img")]


def settle(driver, timeout: float = 120) -> list[str]:
    """Wait until the newest request sent is the one shown (its images), or the page shows an error (a
    failure, with the page's message: a request that errs is never shown, so waiting on would only time out)."""
    WebDriverWait(driver, timeout).until(lambda d: d.execute_script(
        "const p = window.fewstepPage; return document.getElementById('error').textContent !== '' || "
        "(p.lastSent > 0 && p.lastShown === p.lastSent);"))
    error = driver.find_element(By.ID, "error").text
    if error:
        pytest.fail(f"the page shows an error: {error}")
    return shown(driver)


def test_typing_drawing_and_lora_sliders_change_the_images(browser, tmp_path):
    args = ("--model", str(MODELS / "emoji-sd"), "--lora", f"{MODELS / 'emoji-style-lora'}:0.0",
            "--lora", f"{MODELS / 'emoji-lcm-lora'}:1.0")
    with running_server(*args) as (url, _, _):
        browser.get(url)
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "conn").text == "live")
        settle(browser)
        prompt = browser.find_element(By.ID, "prompt")
        prompt.send_keys("red apple")
        first = settle(browser)
        assert len(first) == 4 and all(src.startswith("data:image/png;base64,") for src in first)
        prompt.send_keys(Keys.BACKSPACE * 5 + "dog face")
        second = settle(browser)
        assert second != first

        sketch = browser.find_element(By.ID, "sketch")
        ActionChains(browser).move_to_element_with_offset(sketch, -60, -60).click_and_hold() \
            .move_by_offset(60, 20).move_by_offset(60, 60).move_by_offset(-40, 50).release().perform()
        drawn = settle(browser)
        assert browser.find_element(By.ID, "use-sketch").is_selected() and drawn != second
        strength = browser.find_element(By.ID, "strength")
        strength.click()
        strength.send_keys(Keys.LEFT * 4)
        assert settle(browser) != drawn

        style = browser.find_elements(By.CSS_SELECTOR, "input.lora")[0]
        before = settle(browser)
        style.click()
        style.send_keys(Keys.RIGHT * 18)          # λ_style 0 → 0.9 in steps of 0.05
        assert style.get_attribute("value") not in ("0", "0.0")
        after = settle(browser)
        assert after != before

        assert re.search(r"latency \d+ ms", browser.find_element(By.ID, "latency").text)
        assert re.search(r"[\d.]+ images/s", browser.find_element(By.ID, "throughput").text)
        assert browser.find_element(By.ID, "error").text == ""
        browser.save_screenshot(str(tmp_path / "serve.png"))
        if os.environ.get("FEWSTEP_SCREENSHOT"):
            shutil.copy(tmp_path / "serve.png", os.environ["FEWSTEP_SCREENSHOT"])


def test_a_pixel_model_gets_a_label_picker(browser):
    with running_server("--model", str(MODELS / "digits-cd")) as (url, _, _):
        browser.get(url)
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "conn").text == "live")
        assert not browser.find_element(By.ID, "prompt").is_displayed()
        first = settle(browser)
        Select(browser.find_element(By.ID, "label")).select_by_value("7")
        seven = settle(browser)
        assert seven and seven != first
        browser.find_element(By.ID, "steps").send_keys(Keys.RIGHT)
        assert settle(browser) != seven


@pytest.fixture(scope="module")
def lcm_server():
    with running_server("--model", str(MODELS / "emoji-lcm")) as (url, _, lines):
        yield url, lines


@pytest.fixture
def logged_browser():
    """A browser whose console is kept (CSP violations and failed loads show up there)."""
    os.environ["SE_AVOID_STATS"] = "true"
    profile = tempfile.mkdtemp(prefix="fewstep-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(DRIVER)), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


ATTACKER = """<!doctype html><html><head><meta charset="utf-8"><title>another site</title></head><body><script>
window.attack = {opened: false, messages: [], code: null, reason: null, error: false};
const ws = new WebSocket("WS_URL");
ws.onopen = () => { window.attack.opened = true;
                    ws.send(JSON.stringify({type: "generate", id: 1, prompt: "stolen", num: 4})); };
ws.onmessage = (e) => window.attack.messages.push(String(e.data).slice(0, 200));
ws.onerror = () => { window.attack.error = true; };
ws.onclose = (e) => { window.attack.code = e.code; window.attack.reason = e.reason; };
</script></body></html>"""


@contextlib.contextmanager
def another_site(html: str):
    """A second tiny HTTP server on another loopback port (another origin) serving ``html`` at ``/``."""
    body = html.encode()

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_of_another_origin_cannot_use_the_socket_but_the_own_page_can(logged_browser, lcm_server):
    url, lines = lcm_server
    browser = logged_browser
    with another_site(ATTACKER.replace("WS_URL", url.replace("http://", "ws://") + "ws")) as evil:
        browser.get(evil)
        WebDriverWait(browser, 60).until(lambda d: d.execute_script(
            "return window.attack.code !== null || window.attack.messages.length > 0"))
        attack = browser.execute_script("return window.attack")
    assert attack["messages"] == [] and attack["code"] == 1008 and attack["reason"] == "origin not allowed", attack
    assert any("refused: a WebSocket from origin 'http://127.0.0.1:" in line for line in lines)
    browser.get(url)                                       # the real page, on its own origin
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "conn").text == "live")
    browser.find_element(By.ID, "prompt").send_keys("red apple")
    assert all(src.startswith("data:image/png;base64,") for src in settle(browser)) and shown(browser)


def console_problems(browser) -> list[str]:
    """The page's console errors: CSP violations, failed loads (a missing favicon is a 404 here)."""
    return [e["message"] for e in browser.get_log("browser") if e["level"] == "SEVERE"
            or "Content Security Policy" in e["message"]]


def test_pending_seed_clear_guidance_favicon_and_busy_retry(logged_browser, lcm_server):
    url, _ = lcm_server
    browser = logged_browser
    browser.get(url)
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "conn").text == "live")
    settle(browser)
    js = browser.execute_script
    # the guidance slider is the model's range: 1 (no guidance) upwards, never 0
    guidance = browser.find_element(By.ID, "guidance")
    assert float(guidance.get_attribute("min")) == 1.0 and float(guidance.get_attribute("max")) == 6.0
    guidance.click()
    guidance.send_keys(Keys.HOME)
    assert float(guidance.get_attribute("value")) == 1.0
    settle(browser)

    # the pending indicator shows while the newest request is out, and goes when its images come
    js("window.pendingSeen = 0; new MutationObserver((records) => { window.pendingSeen += records.filter((r) => "
       "r.oldValue !== null).length; }).observe(document.getElementById('pending'), "
       "{attributes: true, attributeFilter: ['hidden'], attributeOldValue: true});")    # counts hidden → shown
    browser.find_element(By.ID, "prompt").send_keys("cat face")
    settle(browser)
    assert js("return window.pendingSeen") > 0 and not browser.find_element(By.ID, "pending").is_displayed()

    # the seed box: a bad value is an error shown at the box, nothing is sent, nothing is rounded
    seed, seed_error = browser.find_element(By.ID, "seed"), browser.find_element(By.ID, "seed-error")
    for bad in ("-5", "3.7", "1e3", ""):           # set at once, as a paste (typed, "3" of "3.7" is a fine seed)
        before = js("return window.fewstepPage.lastSent")
        js("const s = document.getElementById('seed'); s.value = arguments[0]; "
           "s.dispatchEvent(new Event('input'));", bad)
        WebDriverWait(browser, 10).until(lambda d: seed_error.is_displayed())
        assert "whole number" in seed_error.text and seed.get_attribute("aria-invalid") == "true"
        assert js("return window.fewstepPage.lastSent") == before and seed.get_attribute("value") == bad
    seed.clear()
    seed.send_keys("12")
    settle(browser)
    assert js("return JSON.parse(window.fewstepPage.lastMessage).seed") == 12
    assert not seed_error.is_displayed() and seed.get_attribute("aria-invalid") == "false"

    # clear resets the sketch toggle
    sketch = browser.find_element(By.ID, "sketch")
    ActionChains(browser).move_to_element_with_offset(sketch, -40, -40).click_and_hold().move_by_offset(80, 60) \
        .release().perform()
    assert browser.find_element(By.ID, "use-sketch").is_selected()
    settle(browser)
    browser.find_element(By.ID, "clear").click()
    assert not browser.find_element(By.ID, "use-sketch").is_selected()
    settle(browser)

    # "server busy" for the newest request: not an error; the page says it waits and sends it again
    js("const p = window.fewstepPage; p.ws.onmessage({data: JSON.stringify({type: 'error', id: p.lastSent, "
       "error: 'server busy: 64 requests in flight', busy: true})});")
    assert "server busy" in browser.find_element(By.ID, "pending").text
    WebDriverWait(browser, 30).until(lambda d: d.execute_script("return window.fewstepPage.busyRetries") == 1)
    settle(browser)
    assert browser.find_element(By.ID, "error").text == ""

    # the favicon is served (no 404), and nothing broke the page's own Content-Security-Policy
    assert js("return document.querySelector('link[rel=icon]').getAttribute('href')") == "/favicon.svg"
    status = browser.execute_async_script("fetch('/favicon.svg').then(r => arguments[0](r.status))")
    assert status == 200
    assert console_problems(browser) == []
