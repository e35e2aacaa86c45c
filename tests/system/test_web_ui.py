"""The web chat UI in a real browser (Debian's Chromium driven by Playwright) against the real server of
tests/system/chat_server.py: streaming, safe rendering, regenerate, edit, settings, errors, phone width,
calculator calls (from a model that makes one) and token log-probabilities."""

import os
import random
import time

import pytest

from tests.system.chat_server import (
    REPLY,
    REPLY_TEXT,
    TOOL_CORPUS,
    TOOL_PARTS,
    TOOL_TEXT,
    XSS,
    PacedGPT,
    reply_model,
    reply_tokenizer,
    serve,
    tool_reply_model,
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed "
                               "(pip install playwright; the browser is Debian's chromium, not a download)")
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no browser at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

CHAT_ROUTE = "/v1/chat/completions"
PHONE = {"width": 375, "height": 667}


@pytest.fixture(scope="module")
def tok():
    return reply_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    model = reply_model(tok, PacedGPT)
    model.delay_s = 0.02  # ~20 steps a reply: ~0.4 s, long enough to watch it grow
    return model


@pytest.fixture(scope="module")
def server(model, tok):
    with serve(model, tok) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Chat:
    """A page of the UI and what it did: the chat requests it sent, the dialogs it opened, the script
    errors and Content-Security-Policy violations it caused."""

    def __init__(self, browser, url: str, viewport: dict | None = None, bypass_csp: bool = False):
        self.context = browser.new_context(viewport=viewport or {"width": 1000, "height": 800}, bypass_csp=bypass_csp)
        self.page = self.context.new_page()
        self.requests: list = []
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        self.page.on("request", lambda r: self.requests.append(r) if r.url.endswith(CHAT_ROUTE) else None)
        self.page.on("dialog", self._dialog)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("console", self._console)
        self.page.goto(url)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, message) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            self.errors.append(message.text)

    def close(self) -> None:
        self.context.close()

    def settings(self, **values: str) -> None:
        """Fills the settings fields (temperature="0", api_key=...), each committed like a user would."""
        if not self.page.locator("#settings").evaluate("d => d.open"):
            self.page.click("#settings summary")
        for name, value in values.items():
            field = self.page.locator("#" + name.replace("_", "-"))
            field.fill(value)
            field.dispatch_event("change")

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")
        self.wait_idle()

    def wait_idle(self) -> None:
        """Until the reply has ended: Send comes back when nothing streams."""
        self.page.locator("#send").wait_for(state="visible")

    def texts(self, role: str) -> list[str]:
        return self.page.locator(f".message.{role} .body").all_text_contents()

    def sent(self, i: int = -1) -> dict:
        return self.requests[i].post_data_json


@pytest.fixture
def chat(browser, server):
    chat = Chat(browser, server[0])
    yield chat
    chat.close()


def test_a_sent_message_gets_a_streamed_reply(chat):
    # record every text the reply shows on its way, from inside the page
    chat.page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const bodies = document.querySelectorAll('.message.assistant .body');
            const text = bodies.length ? bodies[bodies.length - 1].textContent : '';
            if (text && text !== window.seen[window.seen.length - 1]) window.seen.push(text);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    chat.settings(temperature="0")
    chat.send("hi there")
    seen = chat.page.evaluate("window.seen")
    assert seen[-1] == REPLY_TEXT
    assert len(seen) >= 3, f"the reply should appear piece by piece, saw only {seen}"
    assert seen[0].startswith("Hello") and len(seen[0]) < len(REPLY_TEXT) / 2
    assert chat.texts("user") == ["hi there"]
    assert chat.texts("assistant") == [REPLY_TEXT]
    body = chat.sent()
    assert body["stream"] is True and body["temperature"] == 0
    assert body["messages"] == [{"role": "user", "content": "hi there"}]
    assert chat.errors == []


def test_markup_in_a_reply_is_shown_as_text_and_never_runs(browser, server):
    # without the page's CSP an inline handler would run, so an alert would prove HTML was parsed
    chat = Chat(browser, server[0], bypass_csp=True)
    try:
        # greedy: at the page's default temperature the scripted model strays about once in a few thousand
        # replies (after "done" into a second copy of the reply, which doubles every mark counted below)
        chat.settings(temperature="0")
        chat.send("show me an image tag")
        reply = chat.page.locator(".message.assistant .body")
        assert XSS in reply.text_content()
        assert chat.page.locator("#messages img").count() == 0
        assert reply.locator("strong").all_text_contents() == ["world"]  # the markdown that is meant
        assert reply.locator("code").all_text_contents() == ["x"]
        time.sleep(0.2)  # an image error handler fires within milliseconds
        assert chat.dialogs == []
        # the check itself works: HTML put into this page does run
        with chat.page.expect_event("dialog"):
            chat.page.evaluate("html => document.body.insertAdjacentHTML('beforeend', html)", XSS.replace("1", "2"))
        assert chat.dialogs == ["2"]
    finally:
        chat.close()


def test_regenerate_asks_again_without_the_last_reply(chat):
    chat.settings(temperature="0")
    chat.send("hello")
    chat.page.click(".message.assistant button:text('Regenerate')")
    chat.wait_idle()
    assert len(chat.requests) == 2
    assert chat.sent(0)["messages"] == chat.sent(1)["messages"] == [{"role": "user", "content": "hello"}]
    assert chat.texts("user") == ["hello"]
    assert chat.texts("assistant") == [REPLY_TEXT]


def test_editing_a_message_drops_what_followed_and_resends(chat):
    chat.settings(temperature="0")
    chat.send("first question")
    chat.send("second question")
    assert chat.sent()["messages"] == [{"role": "user", "content": "first question"},
                                       {"role": "assistant", "content": REPLY},
                                       {"role": "user", "content": "second question"}]
    assert len(chat.texts("assistant")) == 2
    chat.page.locator(".message.user").first.locator("button:text('Edit')").click()
    chat.page.fill("textarea.edit", "a better first question")
    chat.page.click("button:text('Save & send')")
    chat.wait_idle()
    assert chat.sent()["messages"] == [{"role": "user", "content": "a better first question"}]
    assert chat.texts("user") == ["a better first question"]
    assert chat.texts("assistant") == [REPLY_TEXT]


def test_max_tokens_and_temperature_go_with_the_request_and_persist(chat, tok, server):
    chat.settings(temperature="0", max_tokens="3")
    chat.send("be brief")
    body = chat.sent()
    assert body["temperature"] == 0 and body["max_tokens"] == 3
    assert chat.texts("assistant") == [tok.decode(tok.encode(REPLY)[:3])]  # "Hello **world": unclosed bold
    assert chat.page.locator(".message.assistant .note").text_content() == "stopped at the max tokens limit"
    chat.page.reload()
    assert chat.page.locator("#temperature").input_value() == "0"
    assert chat.page.locator("#max-tokens").input_value() == "3"


def test_a_system_prompt_leads_every_request_and_persists(chat):
    chat.send("hi")
    assert [m["role"] for m in chat.sent()["messages"]] == ["user"]  # none set: none sent
    chat.settings(system_prompt="  answer like a pirate \n")
    chat.send("and again")
    sent = chat.sent()["messages"]
    assert sent[0] == {"role": "system", "content": "answer like a pirate"}
    assert [m["role"] for m in sent[1:]] == ["user", "assistant", "user"]
    assert chat.texts("user") == ["hi", "and again"]  # the conversation does not show it
    chat.page.reload()
    assert chat.page.locator("#system-prompt").input_value() == "  answer like a pirate \n"


def test_stop_ends_the_reply_and_frees_its_blocks(chat, model, server):
    engine = server[1]
    chat.settings(temperature="0")
    model.delay_s = 0.25  # a reply would take ~5 s
    try:
        chat.page.fill("#prompt", "tell me everything")
        chat.page.press("#prompt", "Enter")
        chat.page.locator(".message.assistant .body p").wait_for()  # the first token is on screen
        chat.page.click("#stop")
        chat.wait_idle()
    finally:
        model.delay_s = 0.02
    assert chat.page.locator(".message.assistant .note").text_content() == "stopped"
    assert len(chat.texts("assistant")[0]) < len(REPLY_TEXT)
    deadline = time.monotonic() + 5
    while (engine.stats()["running"] or engine.stats()["kv_cache_usage"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["running"] == 0 and engine.stats()["kv_cache_usage"] == 0.0
    assert chat.errors == []


def test_an_api_key_is_asked_for_then_sent_as_bearer(browser, model, tok):
    with serve(model, tok, api_keys=["sesame"]) as (url, _):
        chat = Chat(browser, url)
        try:
            error = chat.page.locator("#error")
            error.wait_for()  # the model list is refused at load
            assert "401" in error.text_content() and "API key" in error.text_content()
            chat.send("hello")
            assert "401" in error.text_content()
            assert chat.texts("assistant") == []  # the question stays, with a way to ask again
            chat.settings(api_key="sesame", temperature="0")
            assert error.is_hidden()
            chat.page.click(".message.user button:text('Retry')")
            chat.wait_idle()
            assert chat.requests[-1].all_headers()["authorization"] == "Bearer sesame"
            assert chat.texts("assistant") == [REPLY_TEXT]
            assert error.is_hidden()
            chat.page.reload()
            assert chat.page.locator("#api-key").input_value() == "sesame"
            assert chat.errors == []
        finally:
            chat.close()


def test_the_page_fits_a_phone_screen(browser, server):
    chat = Chat(browser, server[0], viewport=PHONE)
    try:
        chat.settings(temperature="0")
        chat.send("a long word: " + "w" * 300)
        # a long line of code from the page's own renderer, in a reply bubble
        chat.page.evaluate("""() => {
            const view = document.createElement('article');
            view.className = 'message assistant';
            const body = document.createElement('div');
            body.className = 'body';
            body.append(renderMarkdown('```\\n' + 'y'.repeat(400) + '\\n```'));
            view.append(body);
            document.getElementById('messages').append(view);
        }""")
        width = chat.page.evaluate("document.documentElement.scrollWidth")
        assert width <= PHONE["width"], f"the page is {width}px wide on a {PHONE['width']}px screen"
        assert chat.page.evaluate("(p => p.scrollWidth > p.clientWidth)(document.querySelector('pre'))"), \
            "the long code line should scroll inside its block"
        for selector in ("#prompt", "#send", "#settings", ".message.user"):
            box = chat.page.locator(selector).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"], selector
    finally:
        chat.close()


ALLOWED_TAGS = {"P", "BR", "STRONG", "EM", "CODE", "PRE", "UL", "OL", "LI", "H3", "H4", "H5", "H6"}


def test_markdown_renders_its_subset(chat):
    def render(text: str) -> str:
        return chat.page.evaluate("t => { const d = document.createElement('div'); d.append(renderMarkdown(t));"
                                  " return d.innerHTML; }", text)

    assert render("a **b** *c* `d`") == "<p>a <strong>b</strong> <em>c</em> <code>d</code></p>"
    assert render("**bold *and italic***") == "<p><strong>bold <em>and italic</em></strong></p>"
    assert render("`**not bold**`") == "<p><code>**not bold**</code></p>"
    assert render("one\ntwo\n\nthree") == "<p>one<br>two</p><p>three</p>"
    assert render("## Title\n- x\n- *y*\n\n3. c\n4. d") == (
        "<h4>Title</h4><ul><li>x</li><li><em>y</em></li></ul><ol start=\"3\"><li>c</li><li>d</li></ol>")
    assert render("```py\nif a < b:\n    **x**\n```\nafter") == (
        '<pre><code class="language-py">if a &lt; b:\n    **x**</code></pre><p>after</p>')
    assert render("```\nstill streaming") == "<pre><code>still streaming</code></pre>"


def test_no_text_becomes_markup(chat):
    # random mixes of markdown syntax and HTML: only the subset's elements come out, no attributes but
    # the code language and the list start, and every '<', '>' and '&' is still there as text
    pieces = ["<", ">", "&", "<img src=x onerror=alert(1)>", "<script>alert(1)</script>", "<b>", "</p>",
              "*", "**", "`", "```", "```js", "\n", "\n\n", "- ", "1. ", "# ", " ", "word", "\"", "'",
              "[link](javascript:alert(1))", "&lt;", "\u202e"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    results = chat.page.evaluate("""texts => texts.map(t => {
        const d = document.createElement('div');
        d.append(renderMarkdown(t));
        const elements = [...d.querySelectorAll('*')];
        return {
            tags: [...new Set(elements.map(e => e.tagName))],
            attributes: [...new Set(elements.flatMap(e => [...e.attributes].map(a => a.name)))],
            text: d.textContent,
        };
    })""", texts)
    for text, result in zip(texts, results, strict=True):
        assert set(result["tags"]) <= ALLOWED_TAGS, text
        assert set(result["attributes"]) <= {"class", "start"}, text
        for char in "<>&":
            assert result["text"].count(char) == text.count(char), (char, text)
    assert chat.dialogs == [] and chat.errors == []


@pytest.fixture(scope="module")
def tool_server():
    tok = reply_tokenizer((REPLY, TOOL_CORPUS))
    model = tool_reply_model(tok, PacedGPT)
    model.delay_s = 0.02
    with serve(model, tok) as running:
        yield running


def test_a_calculator_call_shows_as_its_own_block_and_goes_back_with_its_parts(browser, tool_server):
    chat = Chat(browser, tool_server[0])
    try:
        chat.settings(temperature="0")
        chat.send("how much are twelve apples?")
        reply = chat.page.locator(".message.assistant .body")
        block = reply.locator("details.tool")
        assert block.count() == 1 and not block.evaluate("d => d.open")  # collapsed, its summary says it all
        assert block.locator("summary").text_content() == "Calculator: 12*3 = 36"
        assert reply.locator("p").all_text_contents() == ["Twelve apples cost ", "36 dollars."]  # the text, around it
        block.locator("summary").click()
        assert block.locator(".tool-call code").text_content() == "12*3"
        assert block.locator(".tool-output code").text_content() == "36"
        chat.send("and thirteen?")
        assert chat.sent()["messages"][1] == {"role": "assistant", "content": TOOL_TEXT, "content_parts": TOOL_PARTS}
        assert chat.page.locator(".message.assistant details.tool").count() == 2
        assert chat.page.locator(".message.assistant details.tool").first.evaluate("d => d.open")  # kept open
        assert chat.page.locator("#error").is_hidden() and chat.errors == []
    finally:
        chat.close()


def test_log_probabilities_shade_each_token_when_asked(browser, tool_server):
    chat = Chat(browser, tool_server[0])
    try:
        chat.settings(temperature="0")
        chat.send("plain")
        assert "logprobs" not in chat.sent() and chat.page.locator(".logprobs").count() == 0
        chat.page.check("#logprobs")
        chat.send("with log-probabilities")
        body = chat.sent()
        assert body["logprobs"] is True and body["top_logprobs"] == 5
        tokens = chat.page.locator(".message.assistant").nth(1).locator(".logprobs .token")
        texts = tokens.all_text_contents()
        assert texts[:4] == ["Twelve", " apples", " cost", " "] and "<|python_start|>" in texts
        assert "".join(t for t in texts if not t.startswith("<|")) == "Twelve apples cost 12*33636 dollars."
        logprobs = [float(v) for v in tokens.evaluate_all("ts => ts.map(t => t.dataset.logprob)")]
        assert all(v <= 0 for v in logprobs)
        first = tokens.first
        assert first.get_attribute("title").startswith('"Twelve": ') and "likeliest:" in first.get_attribute("title")
        shades = set(tokens.evaluate_all("ts => ts.map(t => t.className)"))
        assert all(c.startswith("token p") for c in shades)
        chat.page.reload()
        assert chat.page.locator("#logprobs").is_checked()
        assert chat.errors == []
    finally:
        chat.close()
