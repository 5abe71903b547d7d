"""The chat page (scripts/web/) in a real headless Chromium, driven with selenium and the system chromedriver.

Two servers: the real one, a process started by scripts/web_demo.py with tests/test_server.py's tiny checkpoint and an
API key; and the app in this process with scripted replies (thinking, Markdown, a tool call: what a random model never
says) behind a real uvicorn. To refresh the screenshots in docs/images:

    SAVE_WEB_SCREENSHOTS=docs/images python -m pytest tests/test_web.py -k scripted
"""

import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from model.files import REPO_ROOT
from tests.test_eval_llm import tiny_checkpoint
from tests.test_server import API_KEY, TOOLS, free_port

ALLOWED_TAGS = {"P", "BR", "H1", "H2", "H3", "H4", "H5", "H6", "PRE", "CODE", "UL", "OL", "LI", "BLOCKQUOTE", "HR",
                "TABLE", "THEAD", "TBODY", "TR", "TH", "TD", "STRONG", "EM", "DEL", "A"}
# The page's own elements around model output: bubbles, the thinking fold, tool-call boxes, the stats line.
PAGE_TAGS = {"DIV", "DETAILS", "SUMMARY"}
STATS = re.compile(r"^(\d+) tokens · [\d.]+ tok/s · prompt (\d+) tokens$")
# Keeps every request the page sends (URL, headers, parsed body), for the tests to read back as window.sent.
RECORD_REQUESTS = """
window.sent = [];
const fetchAsIs = window.fetch;
window.fetch = (url, options = {}) => {
  window.sent.push({url: new URL(url, location.href).href, headers: options.headers,
                    body: options.body && JSON.parse(options.body)});
  return fetchAsIs(url, options);
};
"""


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,800", "--lang=en-US"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service("/usr/bin/chromedriver"))
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """scripts/web_demo.py with a tiny checkpoint; $BROWSER records the URL it opens (and says it is up)."""
    out = tmp_path_factory.mktemp("out")
    total, _ = tiny_checkpoint(out, max_position_embeddings=8192).count_parameters()
    opened = out / "opened.txt"
    record = "import sys; open(sys.argv[2], 'w').write(sys.argv[1])"  # no os.pathsep (:) in $BROWSER
    port, log = free_port(), open(out / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "web_demo.py"), "--weight", "full_sft", "--hidden_size", "64",
         "--out_dir", str(out), "--port", str(port), "--max_tokens", "4000", "--api_key", API_KEY],
        stdout=log, stderr=subprocess.STDOUT, cwd=out,
        env={**os.environ, "HF_HUB_OFFLINE": "1",
             "BROWSER": shlex.join([sys.executable, "-c", record, "%s", str(opened)])},
    )
    try:
        deadline = time.time() + 120
        while not (opened.is_file() and opened.read_text()):
            assert proc.poll() is None and time.time() < deadline, (out / "server.log").read_text()
            time.sleep(0.3)
        yield {"page": opened.read_text(), "api": f"http://127.0.0.1:{port}/v1", "parameters": total}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


LIST, WEATHER, FAIL = "How do I reverse a list in Python?", "What's the weather in Paris?", "Fail, please."
SCRIPT = {  # the scripted server's reply to each question, as the pieces a model would stream; None: it breaks down
    LIST: ["<think>\nThe user wants a list reversed. ", "Slicing copies it; reverse() works in place.\n</think>\n\n",
           "Two ways:\n\n", "1. **Slicing** makes a reversed copy:\n\n", "```python\nitems = [1, 2, 3]\n",
           "print(items[::-1])  # [3, 2, 1]\n```\n\n", "2. `items.reverse()` reverses *in place* and returns `None`."],
    WEATHER: ["<think>\nI need the weather tool.\n</think>\n\n", "Let me check.\n",
              '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'],
    FAIL: None,
}


@pytest.fixture(scope="module")
def scripted():
    """The server's app in this process, under a real uvicorn, answering SCRIPT's questions."""
    import uvicorn

    from model import MiniMindConfig, MiniMindForCausalLM
    from model.generation import ReplyStream
    from model.loading import load_tokenizer
    from scripts import serve_openai_api
    from tests.test_eval_llm import SHAPE

    class Scripted(ReplyStream):
        def __init__(self, model, tokenizer, prompt: str, config):
            super().__init__(model, tokenizer, prompt, config)
            self.question = prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>")[0]

        def __iter__(self):
            pieces = SCRIPT[self.question]
            if pieces is None:
                yield "Half a"
                raise RuntimeError("the model fell over")
            self.completion_tokens, self.text = len(pieces), "".join(pieces)
            yield from pieces

    model = MiniMindForCausalLM(MiniMindConfig(**SHAPE)).eval()
    app = serve_openai_api.create_app(model, load_tokenizer(), max_tokens=64)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serve_openai_api, "ReplyStream", Scripted)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            assert thread.is_alive()
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/"
        server.should_exit = True
        thread.join(timeout=10)


def wait_for(driver, condition, timeout: float = 60):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda _: condition())


def element(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def elements(driver, css: str) -> list:
    return driver.find_elements(By.CSS_SELECTOR, css)


def open_page(driver, url: str) -> None:
    """Load the page, give it the key if it asks, and record what it sends from then on."""
    driver.get(url)
    wait_for(driver, lambda: element(driver, "#model").text != "connecting…" or element(driver, "#key-dialog")
             .get_attribute("open"))
    if element(driver, "#key-dialog").get_attribute("open"):
        element(driver, "#key-input").send_keys(API_KEY, Keys.ENTER)
    wait_for(driver, lambda: element(driver, "#model").text.startswith("minimind"))
    driver.execute_script(RECORD_REQUESTS)


def say(driver, *keys: str) -> str:
    """Type a message, press Enter, wait for the whole reply; returns its stats line."""
    replies = len(elements(driver, ".message.assistant"))
    element(driver, "#prompt").send_keys(*keys, Keys.ENTER)

    def ending() -> list:  # the new reply's stats line or error, once there
        bubbles = elements(driver, ".message.assistant")
        return bubbles[replies:] and bubbles[-1].find_elements(By.CSS_SELECTOR, ".stats, .error")

    end = wait_for(driver, ending)[0]
    assert end.get_attribute("class") == "stats", end.text
    return end.text


def set_value(driver, css: str, value: str) -> None:
    field = element(driver, css)
    field.clear()
    field.send_keys(value)


def test_the_page_is_public_the_api_needs_the_key_and_the_page_asks_once(server, browser):
    assert server["page"] == server["api"][:-len("v1")]  # web_demo.py opened the browser at the page, once it was up
    page = httpx.get(server["page"], timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self': no inline script runs
    for asset in ("app.js", "markdown.js", "style.css"):
        assert httpx.get(f"{server['page']}web/{asset}", timeout=10).status_code == 200
    assert httpx.get(f"{server['api']}/models", timeout=10).status_code == 401

    browser.get(server["page"])
    browser.execute_script("sessionStorage.clear()")
    browser.refresh()
    wait_for(browser, lambda: element(browser, "#key-dialog").get_attribute("open"))
    element(browser, "#key-input").send_keys("wrong", Keys.ENTER)
    wait_for(browser, lambda: "API key" in element(browser, "#model").text)  # the server's 401 message
    wait_for(browser, lambda: element(browser, "#key-dialog").get_attribute("open"))  # asked again
    element(browser, "#key-input").send_keys(API_KEY, Keys.ENTER)
    size = f"{server['parameters'] / 1e6:.2f}M"
    wait_for(browser, lambda: element(browser, "#model").text == f"minimind · {size} params")
    assert browser.execute_script("return sessionStorage.getItem('minimind-api-key')") == API_KEY
    browser.refresh()  # the key is kept for this tab: not asked again, and never put in a URL
    wait_for(browser, lambda: element(browser, "#model").text.startswith("minimind ·"))
    assert not element(browser, "#key-dialog").get_attribute("open") and API_KEY not in browser.current_url
    assert element(browser, "#max-tokens").get_attribute("max") == "4000"  # the server's --max_tokens


def test_a_chat_streams_replies_keeps_the_history_and_clears_it(server, browser):
    open_page(browser, server["page"])
    set_value(browser, "#system", "Be brief.")
    element(browser, "#temperature").send_keys(Keys.HOME)  # the slider to 0: greedy
    assert element(browser, "#temperature-value").text == "0"
    set_value(browser, "#max-tokens", "20")
    element(browser, "#thinking").click()

    first = STATS.match(say(browser, "hi"))
    assert first and 0 < int(first[1]) <= 20
    second = STATS.match(say(browser, "line one", Keys.SHIFT, Keys.ENTER, Keys.NULL, "line two"))  # Shift+Enter
    assert [m.text for m in elements(browser, ".message.user")] == ["hi", "line one\nline two"]
    requests = browser.execute_script("return window.sent")
    assert [r["url"] for r in requests] == [server["page"] + "v1/chat/completions"] * 2
    assert requests[1]["headers"]["Authorization"] == f"Bearer {API_KEY}"
    body = requests[1]["body"]
    assert {k: body[k] for k in ("model", "temperature", "top_p", "max_tokens", "stream", "stream_options",
                                 "chat_template_kwargs")} == {
        "model": "minimind", "temperature": 0, "top_p": 0.85, "max_tokens": 20, "stream": True,
        "stream_options": {"include_usage": True}, "chat_template_kwargs": {"open_thinking": True}}
    # The history sent back holds the first reply exactly as the server says it (greedy), streamed piece by piece.
    greedy = httpx.post(f"{server['api']}/chat/completions", timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                        json={**requests[0]["body"], "stream": False}).json()["choices"][0]["message"]["content"]
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": greedy},
                                {"role": "user", "content": "line one\nline two"}]
    assert int(second[2]) > int(first[2])  # the prompt grew by the first exchange

    element(browser, "#clear").click()
    assert not elements(browser, ".message") and element(browser, "#empty").is_displayed()
    again = STATS.match(say(browser, "hi"))
    assert browser.execute_script("return window.sent")[-1]["body"]["messages"] == body["messages"][:2]
    assert again[2] == first[2]  # the same prompt as the first: nothing left of the cleared history


def test_stop_ends_the_generation_on_the_server(server, browser):
    open_page(browser, server["page"])
    element(browser, "#temperature").send_keys(Keys.HOME)
    set_value(browser, "#max-tokens", "4000")  # greedy, "hi" runs to max_tokens (tests/test_server.py): 10-30 s here
    element(browser, "#prompt").send_keys("hi", Keys.ENTER)
    answer = lambda: elements(browser, ".message.assistant .answer")[-1].text  # noqa: E731
    wait_for(browser, lambda: len(answer()) > 0)
    seen = len(answer())
    wait_for(browser, lambda: len(answer()) > seen)  # streamed: the reply grows on the page as it is generated
    element(browser, "#stop").click()
    wait_for(browser, lambda: element(browser, "#send").is_displayed(), timeout=10)
    stats = elements(browser, ".message.assistant .stats")[-1].text
    assert re.fullmatch(r"\d+ chunks · [\d.]+ chunks/s · stopped", stats)  # no usage: the stream was cut
    start = time.perf_counter()  # the server's one generation slot is free again: a short request is answered now
    short = httpx.post(f"{server['api']}/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, timeout=60)
    assert short.status_code == 200 and time.perf_counter() - start < 3


def test_html_in_messages_is_shown_as_text(server, browser):
    open_page(browser, server["page"])
    set_value(browser, "#max-tokens", "40")
    hostile = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b> **md**'
    say(browser, hostile)
    assert element(browser, ".message.user").text == hostile  # as typed: not HTML, not Markdown
    # Nothing of it became an element, and the model's (random) reply holds only whitelisted ones.
    tags = browser.execute_script("return [...document.querySelectorAll('#messages *')].map(e => e.tagName)")
    assert set(tags) <= ALLOWED_TAGS | PAGE_TAGS, tags
    assert browser.execute_script("return window.pwned") is None


HOSTILE_MARKDOWN = """<script>window.pwned = 1</script>
<img src=x onerror="window.pwned = 2"> **<b onclick="window.pwned = 3">bold</b>** `<i>code</i>`
[click](javascript:window.pwned=4) [data](data:text/html,<script>x</script>) [ok](https://example.com/?a="b"onclick=x)
```html
<script>window.pwned = 5</script>
```
| <svg onload="window.pwned = 6"> | b |
|---|---|
| <iframe src="javascript:x"> | *y* |
> <style>body{display:none}</style>"""


RENDER = "const box = document.createElement('div'); box.append(renderMarkdown(arguments[0]));"


def test_the_markdown_renderer_builds_only_whitelisted_elements_and_text(scripted, browser):
    browser.get(scripted)
    result = browser.execute_script(RENDER + """
      const all = [...box.querySelectorAll('*')];
      return {html: box.innerHTML, text: box.textContent, tags: all.map(e => e.tagName),
              attributes: all.flatMap(e => [...e.attributes].map(a => [e.tagName, a.name, a.value]))}
    """, HOSTILE_MARKDOWN)
    assert set(result["tags"]) <= ALLOWED_TAGS, result["html"]
    assert result["attributes"] == [["A", "href", 'https://example.com/?a="b"onclick=x'],  # a value, not markup
                                    ["A", "rel", "noopener noreferrer"], ["A", "target", "_blank"]]
    for text in ("<script>window.pwned = 1</script>", '<img src=x onerror="window.pwned = 2">',
                 "[click](javascript:window.pwned=4)", "<svg onload=", "<style>body{display:none}</style>"):
        assert text in result["text"]
    assert browser.execute_script("return window.pwned") is None

    markdown = ("# Title\n\nSome **bold *and em***, `a < b` and ~~gone~~.\nNext line.\n\n- one\n- two\n  - nested\n\n"
                "3. three\n4. four\n\n```python\nprint('<hi>')\n```\n\n| x | y |\n|---|:-:|\n| 1 | **2** |\n\n"
                "---\n> quoted")
    assert browser.execute_script(RENDER + "return box.innerHTML", markdown) == (
        "<h1>Title</h1><p>Some <strong>bold <em>and em</em></strong>, <code>a &lt; b</code> and <del>gone</del>.<br>"
        "Next line.</p><ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul><ol start=\"3\"><li>three</li>"
        "<li>four</li></ol><pre><code>print('&lt;hi&gt;')</code></pre><table><thead><tr><th>x</th><th>y</th></tr>"
        "</thead><tbody><tr><td>1</td><td><strong>2</strong></td></tr></tbody></table><hr><blockquote><p>quoted</p>"
        "</blockquote>")
    # Mid-stream, an unclosed fence is already code.
    streaming = browser.execute_script(RENDER + "return box.innerHTML", "Look:\n```\n<b>x")
    assert streaming == "<p>Look:</p><pre><code>&lt;b&gt;x</code></pre>"


def test_scripted_thinking_markdown_and_tool_calls_are_shown(scripted, browser):
    open_page(browser, scripted)
    set_value(browser, "#system", "You are a helpful assistant.")
    set_value(browser, "#tools", json.dumps(TOOLS))
    say(browser, LIST)
    thinking = element(browser, ".message.assistant .thinking")
    assert thinking.tag_name == "details" and not thinking.get_attribute("open")  # folded once the answer began
    element(browser, ".thinking summary").click()
    assert thinking.text == "Thought\nThe user wants a list reversed. Slicing copies it; reverse() works in place."
    dim = browser.execute_script("return [getComputedStyle(arguments[0]).color, getComputedStyle(arguments[1]).color]",
                                 thinking, element(browser, ".answer"))
    assert dim[0] != dim[1]
    assert element(browser, ".answer pre code").text == "items = [1, 2, 3]\nprint(items[::-1])  # [3, 2, 1]"
    assert [e.text for e in elements(browser, ".answer strong")] == ["Slicing"]
    assert elements(browser, ".stats")[-1].text.startswith(f"{len(SCRIPT[LIST])} tokens · ")

    say(browser, WEATHER)
    box = elements(browser, ".message.assistant")[-1]
    assert box.find_element(By.CSS_SELECTOR, ".answer").text == "Let me check."
    assert box.find_element(By.CSS_SELECTOR, ".tool-call").text == 'tool call: get_weather\n{\n  "city": "Paris"\n}'
    answer = "".join(SCRIPT[LIST][2:])
    body = browser.execute_script("return window.sent")[-1]["body"]
    assert body["tools"] == TOOLS and body["messages"][:3] == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": LIST},
        {"role": "assistant", "content": answer}]  # the thinking stays out of the history

    save = os.environ.get("SAVE_WEB_SCREENSHOTS")
    try:
        if save:
            browser.set_window_size(1280, 1000)
            browser.save_screenshot(os.path.join(save, "web_chat.png"))
        browser.set_window_size(390, 844)  # a phone: one column, nothing wider than the screen, not even the code
        element(browser, "#settings summary").click()  # fold the settings, as the page does when loaded on a phone
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
        aside, main, prompt = (element(browser, css).rect for css in ("aside", "main", "#prompt"))
        assert aside["y"] + aside["height"] <= main["y"] and prompt["x"] + prompt["width"] <= 390
        if save:
            browser.save_screenshot(os.path.join(save, "web_chat_phone.png"))
        browser.refresh()
        wait_for(browser, lambda: element(browser, "#model").text.startswith("minimind"))
        assert not element(browser, "#settings").get_attribute("open")
    finally:
        browser.set_window_size(1200, 800)


def test_a_reply_that_breaks_down_shows_an_error_and_stays_out_of_the_history(scripted, browser):
    open_page(browser, scripted)
    element(browser, "#prompt").send_keys(FAIL, Keys.ENTER)
    wait_for(browser, lambda: elements(browser, ".message.assistant .error"))
    assert element(browser, ".message.assistant .answer").text == "Half a" and element(browser, "#send").is_displayed()
    say(browser, WEATHER)
    assert browser.execute_script("return window.sent")[-1]["body"]["messages"] == [
        {"role": "user", "content": WEATHER}]
