"""The chat page (/ui) in a real headless Chromium, driven by selenium + chromedriver against
a live `vlmc serve` that serves the demo model under two ids.

What a person would do and see: attach an image, ask, watch the answer stream in, follow
up, stop a long reply, switch models, use it on a 400 px wide screen and from the keyboard.
Model output that tries to be HTML is fed to the page through a stubbed fetch (the demo
model only talks about shapes) and must come out as text.

Screenshots go to tests/artifacts/ui/ (or $VLMC_TEST_ARTIFACTS); the folder ignores itself
in git. Without Chromium and chromedriver the tests skip with the reason, except when
VLMC_REQUIRE_BROWSER=1 (set by .ci/run once it has installed them): then they fail.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from serve_helpers import EXAMPLES, LiveServer

KEY = "sk-vlmc-ui-test"
IMAGE = EXAMPLES / "shapes-1.png"
REQUIRED = os.environ.get("VLMC_REQUIRE_BROWSER") == "1"


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason}, and VLMC_REQUIRE_BROWSER=1 says a browser is installed")
    pytest.skip(reason)


try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError:
    webdriver = None


def _chrome_binaries() -> tuple[str | None, str | None]:
    browser = next((p for n in ("chromium", "chromium-browser", "google-chrome", "chrome") if (p := shutil.which(n))), None)
    return browser, shutil.which("chromedriver")


@pytest.fixture(scope="module")
def artifacts() -> Path:
    folder = Path(os.environ.get("VLMC_TEST_ARTIFACTS") or Path(__file__).parent / "artifacts") / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder.parent / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")
    print(f"\nchat page screenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def browser():
    if webdriver is None:
        _unavailable("selenium is not installed (pip install -e '.[test]')")
    binary, driver_path = _chrome_binaries()
    if not binary or not driver_path:
        _unavailable("no Chromium and chromedriver on PATH (Debian: apt-get install chromium chromium-driver)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900", "--force-color-profile=srgb", "--hide-scrollbars=false"):
        opts.add_argument(arg)
    try:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    except WebDriverException as e:
        _unavailable(f"Chromium did not start: {e.msg}")
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vlmc.demo import MODEL_DIR
    copy = tmp_path_factory.mktemp("models") / "demo-copy"
    shutil.copytree(MODEL_DIR, copy)
    s = LiveServer(str(MODEL_DIR), str(copy), key=KEY)
    yield s
    s.stop()


# ---------------------------------------------------------------------- helpers
def open_page(driver, server, width: int = 1280, height: int = 900, key: bool = True):
    """The page at a given viewport width, with the API key stored (as after typing it once)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
    driver.get(server.base + "/ui")
    driver.execute_script("localStorage.clear(); if (arguments[0]) localStorage.setItem('vlmc-key', arguments[0]);",
                          KEY if key else None)
    driver.get(server.base + "/ui")
    assert driver.execute_script("return innerWidth") == width
    if key:
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)


def wait(driver, condition, timeout: float = 40, poll: float = 0.05):
    return WebDriverWait(driver, timeout, poll_frequency=poll).until(condition)


def js(driver, script: str, *args):
    return driver.execute_script(script, *args)


def model_state(driver) -> str:
    return driver.find_element(By.ID, "model-state").text


def ask(driver, question: str, image: Path | None = None) -> None:
    if image is not None:
        before = len(driver.find_elements(By.CSS_SELECTOR, "#thumbs img"))
        driver.find_element(By.ID, "files").send_keys(str(image))
        wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == before + 1)
    box = driver.find_element(By.ID, "text")
    box.send_keys(question)
    box.send_keys(Keys.ENTER)


def last_reply(driver) -> dict:
    """Text, stats and state of the newest assistant message, once its reply has ended."""
    wait(driver, lambda d: js(d, "const a = [...document.querySelectorAll('.assistant')].pop();"
                                 "return a && a.getAttribute('aria-busy') === 'false'"))
    return js(driver, """
        const a = [...document.querySelectorAll('.assistant')].pop();
        return {text: a.querySelector('.content').textContent, stats: a.querySelector('.stats').textContent,
                who: a.querySelector('.who').textContent, classes: a.className,
                completion: a.querySelector('.stats').dataset.completionTokens || null};""")


def no_horizontal_overflow(driver) -> dict:
    """Widths that must not exceed the viewport: the page, the conversation, every message."""
    return js(driver, """
        const doc = document.documentElement, log = document.getElementById('log');
        const right = Math.max(0, ...[...document.querySelectorAll('.msg, .msg *, form, header')]
                                     .map((e) => e.getBoundingClientRect().right));
        return {page: doc.scrollWidth <= doc.clientWidth, log: log.scrollWidth <= log.clientWidth,
                right: right <= innerWidth + 0.5, widths: [doc.scrollWidth, doc.clientWidth, log.scrollWidth,
                log.clientWidth, right, innerWidth]};""")


def placeholder_fits(driver, element_id: str) -> tuple[float, float]:
    """(placeholder text width, room for text) of an input, in CSS pixels."""
    return tuple(js(driver, """
        const i = document.getElementById(arguments[0]), cs = getComputedStyle(i);
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = `${cs.fontStyle} ${cs.fontWeight} ${cs.fontSize} ${cs.fontFamily}`;
        return [ctx.measureText(i.placeholder).width,
                i.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)];""", element_id))


def server_answer(server, messages: list[dict], model: str = "vlmc-demo") -> str:
    status, body = server.post("/v1/chat/completions", {"model": model, "messages": messages, "temperature": 0,
                                                          "max_tokens": 256})
    assert status == 200, body
    return body["choices"][0]["message"]["content"]


def image_uri() -> str:
    import base64
    return "data:image/png;base64," + base64.b64encode(IMAGE.read_bytes()).decode()


# ---------------------------------------------------------------------- tests
def test_image_question_streams_the_answer_and_the_conversation_goes_on(browser, server, artifacts):
    d = browser
    open_page(d, server, key=False)
    # without the key the model list is refused, and the page says so
    wait(d, lambda d: "cannot list models" in model_state(d))
    d.find_element(By.ID, "key").send_keys(KEY, Keys.TAB)  # change event: stored, models listed again
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#model option")) == 2)
    options = {o.get_attribute("value"): o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")}
    loaded = json.loads(server.get("/health")[2])["model"]
    assert set(options) == {"vlmc-demo", "demo-copy"}
    assert options[loaded] == f"{loaded} (loaded)"
    assert all(t == f"{m} (not loaded)" for m, t in options.items() if m != loaded), options
    Select(d.find_element(By.ID, "model")).select_by_value("vlmc-demo")
    wait(d, lambda d: model_state(d).startswith("loaded"))
    assert "1024 tokens context" in model_state(d)

    ask(d, "What color is the circle?", IMAGE)
    reply = last_reply(d)
    assert reply["text"] == "green" and reply["who"] == "vlmc-demo", reply
    assert re.search(r"\d+ prompt tokens.* \d+ generated.*total [\d.]+ s", reply["stats"]), reply["stats"]
    # the attached image is shown in the conversation as a thumbnail, and the composer is empty again
    thumbs = js(d, "return [...document.querySelectorAll('.user .thumb img')].map((i) => "
                   "[i.naturalWidth, i.getBoundingClientRect().width, i.alt])")
    assert len(thumbs) == 1 and thumbs[0][0] > 0 and 0 < thumbs[0][1] <= 100 and "shapes-1.png" in thumbs[0][2]
    assert d.find_elements(By.CSS_SELECTOR, "#thumbs img") == [] and d.find_element(By.ID, "text").get_attribute("value") == ""

    # a follow-up without a new image: the page sends the whole conversation, image included
    ask(d, "Describe the image.")
    reply = last_reply(d)
    history = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_uri()}},
                                            {"type": "text", "text": "What color is the circle?"}]},
               {"role": "assistant", "content": "green"},
               {"role": "user", "content": [{"type": "text", "text": "Describe the image."}]}]
    assert reply["text"] and reply["text"] == server_answer(server, history), reply
    tokens = int(reply["completion"])
    rate = re.search(rf"{tokens} generated · ([\d.]+) tok/s", reply["stats"])
    assert tokens > 1 and rate and float(rate.group(1)) > 0, reply["stats"]
    assert all(no_horizontal_overflow(d)[k] for k in ("page", "log", "right"))
    d.save_screenshot(str(artifacts / "chat-1280.png"))


def test_stop_ends_a_long_reply_mid_stream(browser, server):
    d = browser
    open_page(d, server)
    limit = d.find_element(By.ID, "max_tokens")
    limit.clear()
    limit.send_keys("1000")
    ask(d, "Tell me about shapes")
    content = "return [...document.querySelectorAll('.assistant .content')].pop().textContent"
    # the reply shows up while it is still being generated (streaming), then Stop ends it
    wait(d, lambda d: js(d, content) and d.find_element(By.ID, "stop").is_enabled(), poll=0.02)
    assert d.find_element(By.CSS_SELECTOR, ".assistant .stats").text.startswith("generating")
    d.find_element(By.ID, "stop").click()
    reply = last_reply(d)
    assert "stopped" in reply["classes"] and reply["stats"].startswith("stopped"), reply
    received = int(re.search(r"(\d+) tokens received", reply["stats"]).group(1))
    assert 0 < received < 1000
    time.sleep(0.5)
    assert js(d, content) == reply["text"]  # nothing arrives after Stop
    assert not d.find_element(By.ID, "stop").is_enabled() and d.find_element(By.ID, "send").is_enabled()
    # the server cancelled the request when the page closed the stream
    deadline = time.time() + 15
    while time.time() < deadline and server.metrics()["batch_size"]:
        time.sleep(0.1)
    assert server.metrics()["batch_size"] == 0
    limit.clear()
    limit.send_keys("256")
    d.find_element(By.ID, "clear").click()  # New chat: the long reply is not sent along
    assert d.find_elements(By.CSS_SELECTOR, ".msg") == []
    ask(d, "What color is the circle?", IMAGE)
    assert last_reply(d)["text"] == "green"


def test_switching_models_shows_which_one_is_loaded(browser, server):
    d = browser
    open_page(d, server)
    Select(d.find_element(By.ID, "model")).select_by_value("vlmc-demo")
    ask(d, "What color is the circle?", IMAGE)  # vlmc-demo is resident after this
    assert last_reply(d)["text"] == "green"
    wait(d, lambda d: model_state(d).startswith("loaded"))

    Select(d.find_element(By.ID, "model")).select_by_value("demo-copy")
    wait(d, lambda d: model_state(d) == "not loaded · loads on the next message")
    js(d, "window.__states = []; new MutationObserver(() => window.__states.push("
          "document.getElementById('model-state').textContent)).observe(document.getElementById('model-state'), "
          "{childList: true, subtree: true, characterData: true})")
    ask(d, "What color is the circle?", IMAGE)
    reply = last_reply(d)
    assert reply["text"] == "green" and reply["who"] == "demo-copy", reply
    assert "loading demo-copy…" in js(d, "return window.__states")  # while the server swapped it in
    assert json.loads(server.get("/health")[2])["model"] == "demo-copy"
    wait(d, lambda d: model_state(d).startswith("loaded"))
    wait(d, lambda d: {o.get_attribute("value"): o.text for o in d.find_elements(By.CSS_SELECTOR, "#model option")}
         == {"vlmc-demo": "vlmc-demo (not loaded)", "demo-copy": "demo-copy (loaded)"})
    # the choice survives a reload
    d.refresh()
    wait(d, lambda d: Select(d.find_element(By.ID, "model")).first_selected_option.get_attribute("value") == "demo-copy")


HOSTILE = (
    "# Shapes\n\n"
    "Here is **bold**, *slanted*, `x < y && y > z` and a [safe link](https://example.com/a?b=1).\n"
    "<script>window.__pwned = 1</script>\n"
    "<img src=x onerror=\"window.__pwned = 2\">\n"
    "A [bad link](javascript:window.__pwned=3), [another](JaVaScRiPt:alert(1)), [data](data:text/html,hi) "
    "and <a href=\"javascript:window.__pwned=4\">raw</a>.\n\n"
    "- one\n- two with `code`\n\n"
    "1. first\n2. second\n\n"
    "```python\nprint(\"<b>not bold</b>\")\n```\n\n"
    + "unbroken" * 60 + "\n"
)


@pytest.mark.parametrize("width", [1280, 400])
def test_model_output_is_rendered_as_markdown_never_as_html(browser, server, artifacts, width):
    d = browser
    open_page(d, server, width=width)
    # the reply, in small pieces, from a stubbed fetch: markup split mid-tag must stay text too
    js(d, """
        window.__pwned = 0;
        const pieces = arguments[0].match(/[\\s\\S]{1,7}/g), real = window.fetch, enc = new TextEncoder();
        const event = (obj) => enc.encode('data: ' + JSON.stringify(obj) + '\\n\\n');
        window.fetch = async (url, init) => {
          if (!String(url).endsWith('/v1/chat/completions')) return real(url, init);
          window.__sent = JSON.parse(init.body);
          return new Response(new ReadableStream({ async start(c) {
            c.enqueue(event({choices: [{index: 0, delta: {reasoning_content: 'the <b>user</b> wants markdown'}}]}));
            for (const p of pieces) {
              c.enqueue(event({choices: [{index: 0, delta: {content: p}}]}));
              await new Promise((ok) => setTimeout(ok, 2));
            }
            c.enqueue(event({choices: [], usage: {prompt_tokens: 7, completion_tokens: 42, total_tokens: 49,
                                                   prompt_tokens_details: {cached_tokens: 3}}}));
            c.enqueue(enc.encode('data: [DONE]\\n\\n'));
            c.close();
          }}), {status: 200, headers: {'Content-Type': 'text/event-stream'}});
        };""", HOSTILE)
    ask(d, "Show me some markdown")
    reply = last_reply(d)
    assert d.execute_script("return window.__sent.stream_options.include_usage") is True
    time.sleep(0.3)  # an <img onerror> would have fired by now
    got = js(d, """
        const a = [...document.querySelectorAll('.assistant')].pop(), c = a.querySelector('.content');
        const all = (s) => [...c.querySelectorAll(s)];
        return {pwned: window.__pwned, scripts: document.querySelectorAll('#log script').length,
                imgs: a.querySelectorAll('img').length, bolds: c.querySelectorAll('b').length,
                links: [...document.querySelectorAll('#log a')].map((l) => [l.textContent, l.getAttribute('href'), l.rel]),
                h: all('h3').map((e) => e.textContent), strong: all('strong').map((e) => e.textContent),
                em: all('em').map((e) => e.textContent), code: all(':not(pre) > code').map((e) => e.textContent),
                ul: all('ul > li').map((e) => e.textContent), ol: all('ol > li').map((e) => e.textContent),
                pre: all('pre code').map((e) => [e.textContent, e.dataset.lang]),
                reasoning: a.querySelector('.reasoning').hidden ? null : a.querySelector('.reasoning div').textContent,
                reasoningOutside: !c.contains(a.querySelector('.reasoning'))};""")
    assert got["pwned"] == 0 and got["scripts"] == 0 and got["imgs"] == 0 and got["bolds"] == 0, got
    assert got["links"] == [["safe link", "https://example.com/a?b=1", "noopener noreferrer nofollow"]], got["links"]
    text = reply["text"]
    for literal in ("<script>window.__pwned = 1</script>", "<img src=x onerror=\"window.__pwned = 2\">",
                    "[bad link](javascript:window.__pwned=3)", "[another](JaVaScRiPt:alert(1))",
                    "<a href=\"javascript:window.__pwned=4\">raw</a>"):
        assert literal in text, literal
    assert got["h"] == ["Shapes"] and got["strong"] == ["bold"] and got["em"] == ["slanted"]
    assert got["code"] == ["x < y && y > z", "code"]
    assert got["ul"] == ["one", "two with code"] and got["ol"] == ["first", "second"]
    assert got["pre"] == [['print("<b>not bold</b>")', "python"]]
    assert got["reasoning"] == "the <b>user</b> wants markdown" and got["reasoningOutside"]
    assert re.match(r"7 prompt tokens \(3 cached\) · 42 generated · [\d.]+ tok/s · first token", reply["stats"]), reply
    overflow = no_horizontal_overflow(d)
    assert overflow["page"] and overflow["log"] and overflow["right"], overflow["widths"]
    d.save_screenshot(str(artifacts / f"markdown-{width}.png"))


def test_narrow_screen_has_no_horizontal_scroll_and_a_usable_input(browser, server, artifacts):
    d = browser
    open_page(d, server, width=400, height=780)
    geometry = js(d, """
        const r = (id) => { const b = document.getElementById(id).getBoundingClientRect();
                            return [b.left, b.right, b.width, b.top, b.bottom]; };
        return {text: r('text'), send: r('send'), stop: r('stop'), attach: r('attach'), model: r('model'),
                settings: getComputedStyle(document.getElementById('settings')).display};""")
    for name in ("text", "send", "stop", "attach", "model"):
        left, right, width, top, bottom = geometry[name]
        assert left >= 0 and right <= 400 and width > 0 and 0 <= top and bottom <= 780, (name, geometry[name])
    assert geometry["text"][2] >= 300, geometry["text"]  # the message box takes the whole row
    assert geometry["settings"] == "none"  # folded away behind the Settings button
    toggle = d.find_element(By.ID, "settings-toggle")
    toggle.click()
    assert toggle.get_attribute("aria-expanded") == "true" and d.find_element(By.ID, "key").is_displayed()
    shown, room = placeholder_fits(d, "key")
    assert shown <= room, (shown, room)
    toggle.click()
    # an attached image can be taken back before sending
    d.find_element(By.ID, "files").send_keys(str(EXAMPLES / "shapes-2.png"))
    d.find_element(By.CSS_SELECTOR, "#thumbs button[aria-label='Remove shapes-2.png']").click()
    assert d.find_elements(By.CSS_SELECTOR, "#thumbs img") == []
    ask(d, "What color is the circle?", IMAGE)
    assert last_reply(d)["text"] == "green"
    assert len(d.find_elements(By.CSS_SELECTOR, ".user .thumb img")) == 1
    overflow = no_horizontal_overflow(d)
    assert overflow["page"] and overflow["log"] and overflow["right"], overflow["widths"]
    d.save_screenshot(str(artifacts / "chat-400.png"))


def test_wide_screen_shows_every_setting_in_full(browser, server):
    d = browser
    open_page(d, server, width=1280)
    assert not d.find_element(By.ID, "settings-toggle").is_displayed()
    for field in ("system", "key"):
        assert d.find_element(By.ID, field).is_displayed()
        shown, room = placeholder_fits(d, field)
        assert shown <= room, (field, shown, room)
    assert all(no_horizontal_overflow(d)[k] for k in ("page", "log", "right"))


def test_keyboard_use_and_names_for_screen_readers(browser, server):
    d = browser
    open_page(d, server)
    # every control has a name a screen reader can announce
    tree = d.execute_cdp_cmd("Accessibility.getFullAXTree", {})["nodes"]
    controls = {}
    for node in tree:
        role = node.get("role", {}).get("value")
        if not node.get("ignored") and role in ("button", "combobox", "textbox", "spinbutton"):
            controls.setdefault(role, []).append(node.get("name", {}).get("value", ""))
    names = [n for ns in controls.values() for n in ns]
    assert all(n.strip() for n in names), controls
    for needed in ("Model", "Temperature", "Max tokens", "System", "API key", "Attach image", "Message",
                   "Send", "Stop", "New chat"):
        assert needed in names, (needed, controls)
    assert any(n.get("role", {}).get("value") == "log" and n.get("name", {}).get("value") == "Conversation" for n in tree)

    # Tab walks through the controls, and the focused one is visibly outlined
    seen = []
    for _ in range(12):
        ActionChains(d).send_keys(Keys.TAB).perform()
        info = js(d, "const e = document.activeElement, s = getComputedStyle(e.id === 'files' ? "
                     "document.getElementById('attach') : e);"
                     "return [e.id || e.tagName, s.outlineStyle, parseFloat(s.outlineWidth)]")
        seen.append(info[0])
        assert info[0] == "BODY" or (info[1] != "none" and info[2] >= 2), info
    order = ["model", "clear", "temperature", "max_tokens", "system", "key", "log", "files", "text", "send"]
    assert [s for s in seen if s in order][:len(order)] == order, seen

    # Shift+Enter is a new line, Enter sends
    box = d.find_element(By.ID, "text")
    box.click()
    box.send_keys("What color")
    box.send_keys(Keys.SHIFT, Keys.ENTER)
    box.send_keys("is the circle?")
    assert box.get_attribute("value") == "What color\nis the circle?"
    assert d.find_elements(By.CSS_SELECTOR, ".msg") == []
    d.find_element(By.ID, "files").send_keys(str(IMAGE))
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 1)
    box.send_keys(Keys.ENTER)
    reply = last_reply(d)
    assert d.find_element(By.CSS_SELECTOR, ".user .bubble").text == "What color\nis the circle?"
    assert reply["text"] == "green"

    # Esc stops a reply (a stream that would never end, which only closing it can stop)
    js(d, """
        const real = window.fetch, enc = new TextEncoder();
        window.__aborted = false;
        window.fetch = async (url, init) => {
          if (!String(url).endsWith('/v1/chat/completions')) return real(url, init);
          return new Response(new ReadableStream({ start(c) {
            c.enqueue(enc.encode('data: ' + JSON.stringify({choices: [{index: 0, delta: {content: 'on and on'}}]}) + '\\n\\n'));
            init.signal.addEventListener('abort', () => {
              window.__aborted = true; c.error(new DOMException('aborted', 'AbortError')); });
          }}), {status: 200, headers: {'Content-Type': 'text/event-stream'}});
        };""")
    box.send_keys("Go on forever", Keys.ENTER)
    wait(d, lambda d: js(d, "return [...document.querySelectorAll('.assistant .content')].pop().textContent") == "on and on")
    ActionChains(d).send_keys(Keys.ESCAPE).perform()
    reply = last_reply(d)
    assert "stopped" in reply["classes"] and js(d, "return window.__aborted"), reply


def test_a_video_file_is_attached_and_sent_as_a_video_part(browser, server):
    d = browser
    open_page(d, server)
    Select(d.find_element(By.ID, "model")).select_by_value("vlmc-demo")
    # resident, or swapped in by the message (an earlier test may have left another model loaded)
    wait(d, lambda d: model_state(d).startswith(("loaded", "not loaded")))
    d.find_element(By.ID, "files").send_keys(str(EXAMPLES / "shapes-clip.mp4"))
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs video")) == 1)
    box = d.find_element(By.ID, "text")
    box.send_keys("Which color appears first?")
    box.send_keys(Keys.ENTER)
    reply = last_reply(d)
    assert "error" not in reply["text"] and reply["completion"], reply
    assert re.search(r"\d+ prompt tokens", reply["stats"]), reply["stats"]
    sent = json.loads(js(d, "return JSON.stringify(history)"))
    parts = [p for m in sent if m["role"] == "user" for p in m["content"] if isinstance(m["content"], list)]
    videos = [p for p in parts if p["type"] == "video_url"]
    assert len(videos) == 1 and videos[0]["video_url"]["url"].startswith("data:video/mp4;base64,")
    shown = js(d, "return [...document.querySelectorAll('.user .thumb video')].map((v) => v.getAttribute('aria-label'))")
    assert shown and "shapes-clip.mp4" in shown[-1]
