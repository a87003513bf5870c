"""The page as a person uses it, in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, which
``./run`` installs with apt; no browser is ever downloaded): typing a prompt shows images, changing it
changes them, drawing on the sketch changes the image-to-image result, moving a LoRA slider changes the
output, latency and images/s are shown; a pixel model gets a label picker. The screenshot is written to
``$FEWSTEP_SCREENSHOT`` when set (``bench/results/serve.png`` in the README is made that way)."""

import os
import re
import shutil
import tempfile
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
