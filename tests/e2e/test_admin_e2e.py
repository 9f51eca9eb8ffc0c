"""The operator's page in headless Chromium (Debian's chromium and chromium-driver), two replicas on the test Redis
recording to the test MariaDB: sign in on one replica, see an answer started through WeCom on the other, stop it
and see its bubble end, find it in the audit search, download its CSV and compare it with `audit export`, reset a
quota and see the next message answered; no console errors. Screenshots at 1280 and 390 pixels wide are kept in
test-artifacts/ (docs/admin-*.png were taken from them)."""

from __future__ import annotations

import csv
import io
import time

import pytest

from demo import dify_standin as d
from services.texts import CATALOGUE
from tests import test_audit
from tests.conftest import KEYS, make_simulator
from tests.conftest import wait_until as eventually
from tests.e2e import test_console
from tests.e2e.test_console import ARTIFACTS, wait_until

pytestmark = pytest.mark.e2e
ZH = CATALOGUE["zh"]
TOKEN = "admin-token-for-the-browser-0123456789"
audit_url, engine = test_audit.audit_url, test_audit.engine  # the audit database's fixtures
browser = test_console.browser  # headless Chromium
LONG = [d.message("part one"), d.sleep(0.3), d.message(" part two"), d.sleep(15), d.message(" never"), d.end()]


def click(driver, selector: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, selector).click()


def fill(driver, name: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.NAME, name)
    field.clear()
    field.send_keys(value)


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def test_an_operator_stops_an_answer_finds_it_and_resets_a_quota(browser, make_pair, engine, audit_url, dify):
    a, b = make_pair(database_url=audit_url, admin_token=TOKEN, quota_user_messages_per_day=1)
    sim = make_simulator(a.url)
    browser.get(f"{b.url}/admin/")
    fill(browser, "name", "ops-anna")
    fill(browser, "token", TOKEN)
    click(browser, "form button[type=submit]")
    wait_until(browser, "return document.body.innerText.includes('Long connection held by')")

    # an answer through WeCom on replica a, live on replica b's page, stopped there
    dify.script(LONG)
    reply = sim.send(sim.text_message("tell me a long story"))
    stream_id = reply["stream"]["id"]
    assert eventually(
        lambda: (
            "".join(b.app.extensions["gateway"].redis.lrange(KEYS.stream_chunks(stream_id), 0, -1))
            == "part one part two"
        )
    )
    browser.get(f"{b.url}/admin/live")
    row = f"tr[data-stream='{stream_id}']"
    wait_until(browser, f'return document.querySelector("{row}") !== null')
    browser.set_window_size(1280, 900)
    browser.save_screenshot(str(ARTIFACTS / "admin-live-1280.png"))
    browser.set_window_size(390, 844)
    browser.save_screenshot(str(ARTIFACTS / "admin-live-390.png"))
    browser.set_window_size(1280, 900)
    click(browser, f"{row} button.danger")
    wait_until(browser, "return document.body.innerText.includes('No answer in flight')")
    assert sim.follow(reply).text == f"part one part two\n\n{ZH['stopped_note']}"
    assert eventually(lambda: len(dify.stops) == 1, timeout=5)

    # the audit search finds it; its CSV is what `audit export` writes for the same filter
    search = f"{b.url}/admin/audit?text=long+story&outcome=stopped"
    for _ in range(40):
        browser.get(search)
        if "tell me a long story" in browser.find_element("id", "audit-rows").text:
            break
        time.sleep(0.25)
    assert "stopped" in browser.find_element("id", "audit-rows").text
    browser.save_screenshot(str(ARTIFACTS / "admin-audit-1280.png"))
    downloaded = browser.execute_async_script(
        "const done = arguments[0];fetch(document.querySelector('a[download]').href).then(r => r.text()).then(done);"
    )
    exported = a.app.test_cli_runner().invoke(
        args=["audit", "export", "--format", "csv", "--text", "long story", "--outcome", "stopped"]
    )
    assert (
        exported.exit_code == 0
        and downloaded == exported.output
        and len(list(csv.reader(io.StringIO(downloaded)))) == 2
    )

    # over the quota, reset on the page, answered again
    dify.script(d.answer("answered"), times=None)
    assert sim.follow(sim.send(sim.text_message("one more"))).text.startswith("你今天的 1 次提问已用完")
    browser.get(f"{b.url}/admin/quotas?scope=user&who=alice")
    wait_until(browser, "return document.querySelector('#quota-rows') !== null")
    click(browser, "form[action='/admin/quotas/reset'] button")
    wait_until(browser, "return document.querySelector('#quota-rows').innerText.includes('0')")
    assert sim.follow(sim.send(sim.text_message("and now?"))).text == "answered"
    browser.get(f"{b.url}/admin/")
    browser.set_window_size(390, 844)
    browser.save_screenshot(str(ARTIFACTS / "admin-bots-390.png"))
    assert console_errors(browser) == []
    sim.close()
