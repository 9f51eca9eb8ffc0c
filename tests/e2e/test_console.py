"""The local console in headless Chromium (Debian's chromium and chromium-driver): the page plays WeCom with
WebCrypto against the real callback endpoint, and shows the finished answer, the exchange and the Redis keys.
A screenshot is kept in test-artifacts/console.png."""

import os
import re
import shutil
import time

import pytest

from config.settings import PROJECT_ROOT
from demo import dify_standin as d
from demo.app import create_app as create_demo_app

pytestmark = pytest.mark.e2e
ARTIFACTS = PROJECT_ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
PUSH_TOKEN = "console-push-token-0123456789"


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail("chromium and chromium-driver are required for the console test")
        pytest.skip("chromium / chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-quic",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for the tests to read
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture
def console_url(settings, serve, tmp_path):
    users = f"sqlite:///{tmp_path / 'users.db'}"  # not the checkout's instance/, which a running demo may use
    changes = {"demo_mode": True, "auth_mode": "none", "database_url": users, "quota_user_messages_per_day": 200}
    app = create_demo_app(settings.replace(**changes))
    app.extensions["gateway"].start()  # served, as `make demo` serves it: its background work runs
    yield f"{serve(app).url}/console"
    app.extensions["gateway"].runner.drain(10)
    app.extensions["gateway"].close()


def wait_until(driver, script, timeout=20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda drv: drv.execute_script(script))


def open_console(browser, url: str) -> None:
    """Load the console and wait until its keys are derived (WebCrypto) and it can send."""
    browser.get(url)
    wait_until(browser, "return document.body.dataset.ready === 'true'")


def say(browser, text: str) -> None:
    """Type a message and send it, as a user would."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "input").send_keys(text)
    browser.find_element(By.ID, "send").click()


FIRST_BOT_FINISHED = "const b = document.querySelector('.msg.bot'); return b && b.dataset.finished === 'true';"


def test_the_console_chats_through_the_real_callback_endpoint(browser, console_url, dify):
    from selenium.webdriver.common.by import By

    dify.script(d.answer("## 你好\n\n这是 **流式** 回答：\n\n- 一\n- 二\n\n`done`", delay=0.05))
    open_console(browser, console_url)
    say(browser, "hello console")

    wait_until(browser, FIRST_BOT_FINISHED)
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.bot")
    assert bubble.find_element(By.TAG_NAME, "h2").text == "你好"
    assert bubble.find_element(By.TAG_NAME, "strong").text == "流式"
    assert [li.text for li in bubble.find_elements(By.TAG_NAME, "li")] == ["一", "二"]
    assert "finished after" not in bubble.text  # the debug footer waits behind its toggle, and so do the panes
    assert not browser.find_element(By.ID, "details").is_displayed()
    browser.find_element(By.ID, "debug").click()
    assert "finished after" in bubble.text
    assert browser.find_element(By.ID, "details").is_displayed()
    row = browser.find_element(By.CSS_SELECTOR, ".row.theirs")  # as WeCom draws it: avatar, the bot's name, bubble
    assert row.find_element(By.CSS_SELECTOR, ".who").text == "default"
    assert browser.find_element(By.CSS_SELECTOR, ".row.mine .who").text == "alice"
    assert "failed" not in bubble.get_attribute("class")
    assert dify.chat_requests()[0]["query"] == "hello console"
    wait_until(browser, "return document.querySelector('.route') !== null")
    assert browser.find_element(By.CSS_SELECTOR, ".route").text == "the bot's own app · dify"

    wait_until(browser, "return document.getElementById('redis').textContent.includes('dify_stream:')")
    redis_panel = browser.find_element(By.ID, "redis").text
    assert '"status": "done"' in redis_panel
    assert "dify_stream:" in redis_panel
    # The message's audit row beside its keys (the demo records to its SQLite file), once a sweep has written it.
    wait_until(browser, "return document.getElementById('redis').textContent.includes('\"outcome\": \"answered\"')")
    assert '"question": "hello console"' in browser.find_element(By.ID, "redis").text
    assert re.search(r'"user": "\w+: 1 of 200 today"', browser.find_element(By.ID, "redis").text)  # the day's quota
    exchange = browser.find_element(By.ID, "exchange").text
    assert "→ text" in exchange
    assert "→ stream" in exchange
    assert "← reply" in exchange

    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "console.png"))
    assert (ARTIFACTS / "console.png").stat().st_size > 10_000
    for width in (820, 390):  # narrower windows: every control of the chat stays on the page, none clipped
        browser.set_window_size(width, 900)
        for control in ("enter", "send", "userid", "chatid"):
            assert browser.execute_script(
                f"const r = document.getElementById('{control}').getBoundingClientRect();"
                "return r.width > 0 && r.left >= 0 && r.right <= document.documentElement.clientWidth;"
            ), (control, width)


def test_the_console_says_under_each_answer_which_route_gave_it(browser, settings, serve, tmp_path, dify):
    from selenium.webdriver.common.by import By

    dify.app_types["app-console-hr"] = "chat"
    bots = tmp_path / "bots.toml"
    bots.write_text(
        f'[bots.default]\ncallback_path = "/wecom/callback"\ntoken = "{settings.bot.wecom.token}"\n'
        f'encoding_aes_key = "{settings.bot.wecom.encoding_aes_key}"\n'
        '[[bots.default.routes]]\nname = "hr"\ncommand = "/hr"\ndify_api_key = "app-console-hr"\n'
    )
    changes = {"demo_mode": True, "auth_mode": "none", "bots_file": str(bots), "bot_name": ""}
    app = create_demo_app(settings.replace(**changes))
    app.extensions["gateway"].start()
    try:
        open_console(browser, f"{serve(app).url}/console")
        dify.script(d.answer("from hr"), times=1)
        say(browser, "/hr how many days off?")
        wait_until(browser, "return document.querySelector('.route') !== null")
        assert browser.find_element(By.CSS_SELECTOR, ".route").text == "route “hr” · dify"
        assert dify.chat_requests()[0]["query"] == "how many days off?"
    finally:
        dify.app_types.pop("app-console-hr", None)
        app.extensions["gateway"].runner.drain(10)
        app.extensions["gateway"].close()


def test_the_console_shows_failures_as_finished_bubbles(browser, console_url, dify):
    from selenium.webdriver.common.by import By

    dify.script([d.message("部分回答"), d.cut()])
    open_console(browser, console_url)
    say(browser, "break please")
    wait_until(browser, FIRST_BOT_FINISHED)
    text = browser.find_element(By.CSS_SELECTOR, ".msg.bot").text
    assert "部分回答" in text
    assert "回答中断" in text


AT_THE_END = (
    "const m = document.getElementById('messages'); return m.scrollHeight - m.scrollTop - m.clientHeight <= 40;"
)


def test_the_console_follows_a_growing_answer_unless_the_user_scrolled_up(browser, console_url, dify):

    long_answer = "".join(f"{i}. line {i} of a long answer\n\n" for i in range(1, 61))
    dify.script(d.answer(long_answer, pieces=60, delay=0.05))
    dify.script(d.answer(long_answer, pieces=60, delay=0.05))
    open_console(browser, console_url)
    say(browser, "a long one")
    wait_until(browser, FIRST_BOT_FINISHED)
    assert browser.execute_script(
        "const m = document.getElementById('messages'); return m.scrollHeight > m.clientHeight;"
    )
    assert browser.execute_script(AT_THE_END)  # followed the answer down as it grew

    say(browser, "another long one")
    wait_until(browser, "return document.querySelectorAll('.msg.bot').length === 2;")
    browser.execute_script("document.getElementById('messages').scrollTop = 0;")  # the user scrolls up to read
    wait_until(browser, "return document.querySelectorAll('.msg.bot')[1].dataset.finished === 'true';")
    assert browser.execute_script("return document.getElementById('messages').scrollTop;") == 0


def test_the_console_exists_only_in_demo_mode(client):
    assert client.get("/console").status_code == 404
    assert client.get("/console/api/config").status_code == 404


@pytest.fixture
def long_connection_console(settings, serve, tmp_path):
    """The demo with a long-connection bot `ops`; the demo starts the WeCom WebSocket stand-in for it."""
    from demo.replicas import free_port

    path = tmp_path / "bots.toml"
    path.write_text(
        f"""
[bots.ops]
mode = "long_connection"
bot_id = "console-ops"
secret = "console-secret"
wecom_ws_url = "ws://127.0.0.1:{free_port()}"
welcome_message = "ops here"
"""
    )
    users = f"sqlite:///{tmp_path / 'users.db'}"  # not the checkout's instance/, which a running demo may use
    app = create_demo_app(
        settings.replace(
            demo_mode=True,
            auth_mode="none",
            bots_file=str(path),
            bot_name="",
            database_url=users,
            push_api_token=PUSH_TOKEN,
        )
    )
    app.extensions["gateway"].start()  # served, as the demo's entry points do: the long-connection bot connects
    yield f"{serve(app).url}/console"
    app.extensions["gateway"].runner.drain(10)
    app.extensions["gateway"].close()


def test_the_console_talks_to_a_long_connection_bot(browser, long_connection_console, dify):
    from selenium.webdriver.common.by import By

    dify.script(d.answer("answered over the **WebSocket**", delay=0.05))
    open_console(browser, long_connection_console)
    assert "WebSocket" in browser.find_element(By.ID, "hint").text  # not "the real callback endpoint"
    browser.find_element(By.ID, "enter").click()
    wait_until(browser, "return [...document.querySelectorAll('.msg.system')].some(m => m.textContent === 'ops here');")
    say(browser, "hello ws")
    wait_until(browser, FIRST_BOT_FINISHED)
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.bot")
    assert bubble.find_element(By.TAG_NAME, "strong").text == "WebSocket"
    browser.find_element(By.ID, "debug").click()
    assert "frames over the WebSocket" in bubble.text


def test_the_console_shows_a_push_of_the_push_api_also_one_sent_before_it_opened(browser, long_connection_console):
    import httpx
    from selenium.webdriver.common.by import By

    base = long_connection_console.removesuffix("/console")
    answer = httpx.post(
        f"{base}/api/push",
        json={"bot": "ops", "userid": "alice", "markdown": "**Deploy** finished"},
        headers={"Authorization": f"Bearer {PUSH_TOKEN}"},
    )
    assert answer.status_code == 202
    open_console(browser, long_connection_console)  # after the push: it is still shown, under the ops bot
    wait_until(
        browser, "return [...document.querySelectorAll('.msg.bot')].some(m => m.textContent.includes('Deploy'));"
    )
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.bot")
    assert bubble.find_element(By.TAG_NAME, "strong").text == "Deploy"
    assert "aibot_send_msg" in bubble.text
    assert browser.find_element(By.CSS_SELECTOR, ".row.theirs .who").text == "ops"


@pytest.mark.parametrize("console", ["console_url", "long_connection_console"])
def test_thumbs_under_an_answer_send_wecom_feedback_events_that_reach_dify(browser, dify, request, console):
    """👍 under a finished answer is WeCom's feedback_event (type 1) on the reply's feedback id, and Dify gets a
    like for that message; a second tap takes it back (type 3: rating null), 👎 is a dislike; in both modes."""
    from selenium.webdriver.common.by import By

    dify.script(d.answer("rate me", delay=0.02))
    open_console(browser, request.getfixturevalue(console))
    say(browser, "a question")
    wait_until(browser, FIRST_BOT_FINISHED)
    wait_until(browser, "return document.querySelectorAll('.feedback button').length === 2;")
    like, dislike = browser.find_elements(By.CSS_SELECTOR, ".feedback button")
    assert (like.text, dislike.text) == ("👍 有用", "👎 没用")  # words beside the thumbs: no emoji font needed

    def rated(expected: list) -> bool:
        deadline = time.monotonic() + 10
        while [body.get("rating") for _, body in dify.feedbacks] != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return [body.get("rating") for _, body in dify.feedbacks] == expected

    like.click()
    assert rated(["like"])
    assert "chosen" in like.get_attribute("class")
    like.click()  # taken back
    assert rated(["like", None])
    dislike.click()
    assert rated(["like", None, "dislike"])


def test_the_console_draws_a_forms_card_and_a_tap_goes_on_with_the_run(browser, console_url, dify):
    from selenium.webdriver.common.by import By

    open_console(browser, console_url)
    say(browser, "请审批这个 form")  # the stand-in's approval app
    wait_until(browser, "return document.querySelector('.msg.card .card-button') !== null;")
    card = browser.find_element(By.CSS_SELECTOR, ".msg.card")
    assert "采购申请" in card.text
    assert [b.text for b in card.find_elements(By.CSS_SELECTOR, ".card-button")] == ["同意", "拒绝"]
    card.find_elements(By.CSS_SELECTOR, ".card-button")[0].click()  # the tap is a real template_card_event
    wait_until(browser, "return document.querySelector('.msg.card .card-desc') !== null;")
    assert "已提交：同意" in browser.find_element(By.CSS_SELECTOR, ".msg.card .card-desc").text
    wait_until(browser, FIRST_BOT_FINISHED)
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.bot:not(.card)")
    assert "需要先审批" in bubble.text and "已同意" in bubble.text
    assert [s["body"]["action"] for s in dify.form_submissions] == ["approve"]
    [spent] = browser.find_elements(By.CSS_SELECTOR, ".msg.card .card-button")  # the answered card's one button
    assert "spent" in spent.get_attribute("class") and not spent.is_enabled()
    browser.find_element(By.ID, "debug").click()
    assert "→ event" in browser.find_element(By.ID, "exchange").text
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "console-card.png"))


def test_the_console_taps_a_card_of_a_long_connection_bot(browser, long_connection_console, dify):
    from selenium.webdriver.common.by import By

    open_console(browser, long_connection_console)
    say(browser, "审批 form")
    wait_until(browser, "return document.querySelector('.msg.card .card-button') !== null;")
    browser.find_elements(By.CSS_SELECTOR, ".msg.card .card-button")[1].click()  # 拒绝, over the WebSocket
    wait_until(browser, "return document.querySelector('.msg.card .card-desc') !== null;")
    assert "已提交：拒绝" in browser.find_element(By.CSS_SELECTOR, ".msg.card .card-desc").text
    wait_until(browser, FIRST_BOT_FINISHED)
    assert "已拒绝" in browser.find_element(By.CSS_SELECTOR, ".msg.bot:not(.card)").text
    assert [s["body"]["action"] for s in dify.form_submissions] == ["reject"]
    assert not browser.find_element(By.CSS_SELECTOR, ".msg.card .card-button").is_enabled()


@pytest.fixture
def console_with_links(settings, tmp_path):
    """The demo console on a port of its own, PUBLIC_BASE_URL pointing at it, so the file links it shows work."""
    import threading

    from werkzeug.serving import make_server

    from demo.replicas import free_port

    port = free_port()
    users = f"sqlite:///{tmp_path / 'users.db'}"
    app = create_demo_app(
        settings.replace(
            demo_mode=True, auth_mode="none", database_url=users, public_base_url=f"http://127.0.0.1:{port}"
        )
    )
    server = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{port}/console"
    server.shutdown()
    app.extensions["gateway"].runner.drain(10)
    app.extensions["gateway"].close()


def test_the_console_shows_a_chart_and_downloads_the_report_through_its_link(browser, console_with_links, tmp_path):
    from selenium.webdriver.common.by import By

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    browser.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    open_console(browser, console_with_links)
    say(browser, "季度报告 report")  # the stand-in's agent makes a chart and a PDF
    wait_until(browser, FIRST_BOT_FINISHED)
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.bot")
    assert bubble.find_elements(By.CSS_SELECTOR, "img[alt=image]")  # the chart, inline
    link = bubble.find_element(By.PARTIAL_LINK_TEXT, "季度报告.pdf")
    assert "/wecom/files/" in link.get_attribute("href")
    link.click()
    wait_until(browser, "return true", timeout=1)
    import time

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not list(downloads.glob("*.pdf")):
        time.sleep(0.2)
    [saved] = list(downloads.glob("*.pdf"))
    assert saved.name == "季度报告.pdf"
    assert saved.read_bytes().startswith(b"%PDF-1.4")
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "console-files.png"))


def test_the_console_draws_a_knowledge_picture_its_sources_and_a_slow_steps_status_line(browser, console_with_links):
    """What Dify knows, as the console draws it: a knowledge answer's picture inline (never its Dify-relative link)
    with its sources at the end; a slow tool's status line while it runs, gone from the finished answer."""
    from selenium.webdriver.common.by import By

    open_console(browser, console_with_links)
    say(browser, "员工手册怎么说？")  # the stand-in's knowledge answer
    wait_until(browser, FIRST_BOT_FINISHED)
    bubble = browser.find_element(By.CSS_SELECTOR, ".msg.bot")
    assert bubble.find_elements(By.CSS_SELECTOR, "img[alt=image]")  # the knowledge base's picture, inline
    assert "/files/" not in bubble.text
    assert "参考资料" in bubble.text and "员工手册.pdf" in bubble.text and "休假制度.docx" in bubble.text

    say(browser, "帮我搜索")  # the stand-in's slow tool
    last = "const bs = document.querySelectorAll('.msg.bot'); const b = bs[bs.length - 1]; return bs.length === 2 && "
    wait_until(browser, last + "b.textContent.includes('正在进行：联网搜索');")
    wait_until(browser, last + "b.dataset.finished === 'true';")
    answer = browser.find_elements(By.CSS_SELECTOR, ".msg.bot")[1].text
    assert "查到了" in answer and "正在进行" not in answer
    ARTIFACTS.mkdir(exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "console-knowledge.png"))
