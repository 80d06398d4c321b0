"""The web chat page in headless Chromium (Debian `chromium`), driven over the DevTools protocol as
a person would use it: type a question, press Enter, watch the answer stream in, ask again (the
page keeps the history), stop an answer, clear. Screenshots are checked for the chat bubbles;
the page's Markdown renderer is checked on the structures the official demo renders."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

import glm2rs

websocket = pytest.importorskip("websocket")
Image = pytest.importorskip("PIL.Image")

USER_BUBBLE = (0xD9, 0xE8, 0xFF)


def chromium_path():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        p = shutil.which(name)
        if p:
            return p
    if os.environ.get("CI") == "true":
        pytest.fail("chromium not found (CI=true: .ci/run installs it)")
    pytest.skip("chromium not installed")


class Browser:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="glm2rs-chromium-")
        self.proc = subprocess.Popen(
            [chromium_path(), "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={self.dir}",
             "--window-size=900,700", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = os.path.join(self.dir, "DevToolsActivePort")
        end = time.time() + 60
        while not (os.path.exists(port_file) and open(port_file).read().strip()):
            if time.time() > end or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start")
            time.sleep(0.1)
        port = int(open(port_file).read().split()[0])
        targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
        page = next(t for t in targets if t["type"] == "page")
        self.ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id = 0

    def cmd(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg["result"]

    def js(self, expr):
        r = self.cmd("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(r["exceptionDetails"])
        return r["result"].get("value")

    def wait(self, expr, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if self.js(expr):
                return
            time.sleep(0.05)
        raise TimeoutError(expr)

    def type_and_enter(self, selector, text):
        self.js(f"document.querySelector({json.dumps(selector)}).focus()")
        self.cmd("Input.insertText", text=text)
        for kind in ("keyDown", "keyUp"):
            self.cmd("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                     **({"text": "\r"} if kind == "keyDown" else {}))

    def screenshot(self):
        import base64

        png = base64.b64decode(self.cmd("Page.captureScreenshot", format="png")["data"])
        return Image.open(io.BytesIO(png)).convert("RGB")

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.kill()
            self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)


def count_color(img, rgb, tol=3):
    import numpy as np

    px = np.asarray(img, dtype=np.int16)
    return int((np.abs(px - np.array(rgb, dtype=np.int16)) <= tol).all(axis=-1).sum())


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


def test_web_chat_in_chromium(model, browser, tmp_path):
    with glm2rs.Server(model, port=0) as s:
        b = browser
        b.cmd("Page.enable")
        b.cmd("Page.navigate", url=s.url + "/")
        b.wait("document.readyState === 'complete' && !!document.getElementById('input')")
        # greedy, short answers so that they can be checked against the model
        b.js("document.getElementById('temperature').value = '0'; document.getElementById('max_tokens').value = '24'")
        # count the updates of the answer bubble: it must grow in several steps (streaming)
        b.js("""window.updates = 0; new MutationObserver(() => window.updates++)
                .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true})""")
        q1, q2 = "你好", "再说一遍"
        b.type_and_enter("#input", q1)
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 1")
        a1 = b.js("document.querySelector('.assistant').dataset.raw")
        assert a1 == model.chat(q1, max_new_tokens=24, do_sample=False)[0]
        assert b.js("document.querySelector('.assistant').textContent.trim()")  # rendered
        assert b.js("window.updates") > 3
        assert b.js("document.querySelector('.user').textContent") == q1
        assert "tokens/s" in b.js("document.getElementById('status').textContent")
        # under the answer: the served model's name, its tokens and tokens/s
        meta = b.js("document.querySelector('.meta').textContent")
        name = json.load(urllib.request.urlopen(s.url + "/v1/models"))["data"][0]["id"]
        assert meta.startswith(name + " · ") and "tokens/s" in meta, meta
        # the second question goes with the history of the first
        b.type_and_enter("#input", q2)
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 2")
        a2 = b.js("document.querySelectorAll('.assistant')[1].dataset.raw")
        assert a2 == model.chat(q2, history=[(q1, a1)], max_new_tokens=24, do_sample=False)[0]
        shot = b.screenshot()
        shot.save(tmp_path / "chat.png")
        assert shot.size[0] >= 800
        assert count_color(shot, USER_BUBBLE) > 500  # the two question bubbles are drawn
        # clear empties the conversation (and its history: the next answer is a first turn again)
        b.js("document.getElementById('clear').click()")
        assert b.js("document.querySelectorAll('.msg').length") == 0
        shot = b.screenshot()
        shot.save(tmp_path / "cleared.png")
        assert count_color(shot, USER_BUBBLE) == 0
        b.type_and_enter("#input", q2)
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 1")
        assert b.js("document.querySelector('.assistant').dataset.raw") == model.chat(
            q2, max_new_tokens=24, do_sample=False)[0]


def test_web_page_shows_server_errors(model, browser):
    with glm2rs.Server(model, port=0, api_key="k") as s:
        b = browser
        b.cmd("Page.navigate", url=s.url + "/")
        b.wait("document.readyState === 'complete' && !!document.getElementById('input')")
        b.js("localStorage.removeItem('glm2rs-key'); document.getElementById('key').value = ''")
        b.type_and_enter("#input", "hi")
        b.wait("document.querySelectorAll('.error').length === 1")
        assert "API key" in b.js("document.querySelector('.error').textContent")
        # with the key the same page works
        b.js("document.getElementById('key').value = 'k'; document.getElementById('max_tokens').value = '4'")
        b.type_and_enter("#input", "hi")
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 1")


def test_web_page_sends_top_p_and_stops(model, browser):
    """top_p goes with the request; Stop ends a long answer mid-stream (the partial answer stays,
    marked stopped, and joins the history), and the server answers the next question."""
    with glm2rs.Server(model, port=0) as s:
        b = browser
        b.cmd("Page.navigate", url=s.url + "/")
        b.wait("document.readyState === 'complete' && !!document.getElementById('input')")
        b.js("""window.bodies = []; const f = window.fetch;
                window.fetch = (u, o) => { if (o && o.body) window.bodies.push(JSON.parse(o.body)); return f(u, o); };
                document.getElementById('temperature').value = '0';
                document.getElementById('top_p').value = '0.6';
                document.getElementById('max_tokens').value = '3500'""")
        assert b.js("document.getElementById('stop').hidden")
        b.type_and_enter("#input", "你好")
        b.wait("(document.querySelector('.assistant') || {dataset: {}}).dataset.raw")
        assert not b.js("document.getElementById('stop').hidden")
        b.js("document.getElementById('stop').click()")
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 1")
        assert b.js("document.querySelector('.assistant').dataset.stopped") == "1"
        assert "stopped" in b.js("document.querySelector('.meta').textContent")
        assert b.js("document.getElementById('stop').hidden")
        partial = b.js("document.querySelector('.assistant').dataset.raw")
        full = model.chat("你好", max_new_tokens=3500, do_sample=False)[0]
        assert partial and len(partial) < len(full) and full.startswith(partial)
        body = b.js("window.bodies[0]")
        assert body["top_p"] == 0.6 and body["temperature"] == 0 and body["max_tokens"] == 3500
        # the next question carries the stopped answer as history, and is answered in full
        b.js("document.getElementById('max_tokens').value = '8'")
        b.type_and_enter("#input", "再说一遍")
        b.wait("document.querySelectorAll('.assistant[data-done]').length === 2")
        assert b.js("window.bodies[1]")["messages"] == [
            {"role": "user", "content": "你好"}, {"role": "assistant", "content": partial},
            {"role": "user", "content": "再说一遍"}]
        assert b.js("document.querySelectorAll('.assistant')[1].dataset.raw") == model.chat(
            "再说一遍", history=[("你好", partial)], max_new_tokens=8, do_sample=False)[0]


MARKDOWN = """# 标题
Some **bold** and *italic* text with `x < y` inline.
a second line
```python
def f(x):
    return x < 1 and "<b>"
```
- one
- two **strong**
1. first
2. second
3. third

| name | value |
| --- | ---: |
| a | 1 |
| <b>b</b> | 2 |

<script>window.pwned = 1</script><img src=x onerror="window.pwned = 1">
```
an open fence while streaming"""


def test_web_page_renders_markdown(model, browser):
    """The page's renderer (what every answer bubble shows) on the structures of the official
    demo's parse_text and Gradio's chatbot: code blocks with their language, inline code, bold,
    italics, headings, both lists, tables; no HTML of the answer is interpreted."""
    with glm2rs.Server(model, port=0) as s:
        b = browser
        b.cmd("Page.navigate", url=s.url + "/")
        b.wait("document.readyState === 'complete' && typeof renderMarkdown === 'function'")
        got = b.js(f"""(() => {{
            const d = document.createElement('div');
            d.className = 'msg assistant';
            d.innerHTML = renderMarkdown({json.dumps(MARKDOWN)});
            document.getElementById('log').appendChild(d);
            const q = (sel) => [...d.querySelectorAll(sel)].map((e) => e.textContent);
            return {{h1: q('h1'), strong: q('strong'), em: q('em'), code: q('p code'),
                     pre: q('pre code'), lang: [...d.querySelectorAll('pre code')].map((e) => e.className),
                     ul: q('ul li'), ol: q('ol li'), th: q('th'), td: q('td'), p: q('p'),
                     tags: d.querySelectorAll('script, img, b').length, pwned: !!window.pwned}};
        }})()""")
        assert got["h1"] == ["标题"]
        assert got["strong"] == ["bold", "strong"] and got["em"] == ["italic"]
        assert got["code"] == ["x < y"]
        assert got["pre"][0] == 'def f(x):\n    return x < 1 and "<b>"'
        assert got["lang"][0] == "language-python"
        assert got["pre"][1] == "an open fence while streaming"
        assert got["ul"] == ["one", "two strong"] and got["ol"] == ["first", "second", "third"]
        assert got["th"] == ["name", "value"] and got["td"] == ["a", "1", "<b>b</b>", "2"]
        assert any("a second line" in p for p in got["p"])
        assert got["tags"] == 0 and not got["pwned"]
