"""The page `serve` shows at /, in headless Chromium (Debian's chromium + chromium-driver, driven by selenium):
pick an image (shrunk in the browser), ask, watch the answer stream in, the timing bar fill and the cache badge;
thinking folded, the API key sent; the page's grounding parser agrees with runtime/grounding.py and its boxes land
on the right canvas pixels; and, end to end, an answer forced into a box by the structured-output constraint
(response_format sent through the page's "extra request fields") is drawn where the server's own grounding
parser puts it. Screenshots are kept under artifacts/web-page/ (ignored by git)."""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

import minicpmv_edge
from minicpmv_edge.workflows.demo import demo_image
from minicpmv_edge.runtime.grounding import GroundingStream, parse
from test_grounding import serving

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts" / "web-page"


def _chromium() -> tuple[str, str]:
    """(chromium, chromedriver), or fail/skip the way setup.sh installs them: where apt-get and root are here,
    setup.sh installs them, so a missing browser is a failure, not a silent skip."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium and driver:
        return chromium, driver
    need = "Debian's chromium and chromium-driver (./setup.sh installs them with apt-get)"
    root = os.geteuid() == 0 or (shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"],
                                                                          capture_output=True).returncode == 0)
    if shutil.which("apt-get") and root:
        pytest.fail(f"the browser test needs {need}, and they are missing although apt-get and root are here: "
                    "run ./setup.sh")
    pytest.skip(f"needs {need}; this machine has no apt-get or no root, so setup.sh skipped them")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium     # with the driver's path given too, selenium downloads nothing
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=opts)
    yield driver
    driver.quit()


class Recorder:
    """ASGI wrapper that keeps each chat request's headers and JSON body, to check what the page sent, and the
    response body, to check what the server answered."""

    def __init__(self, app):
        self.app, self.requests = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != "/v1/chat/completions":
            return await self.app(scope, receive, send)
        record = {"headers": {k.decode(): v.decode() for k, v in scope["headers"]}, "body": b"", "response": b""}
        self.requests.append(record)

        async def recording_receive():
            message = await receive()
            record["body"] += message.get("body", b"")
            return message

        async def recording_send(message):
            if message["type"] == "http.response.body":
                record["response"] += message.get("body", b"")
            await send(message)
        return await self.app(scope, recording_receive, recording_send)


@pytest.fixture(scope="module")
def model(tiny_bundle):
    m = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    yield m
    m.close()


@pytest.fixture(scope="module")
def site(model):
    recorder = []

    def wrap(app):
        recorder.append(Recorder(app))
        return recorder[0]
    with serving(model, wrap=wrap) as base:
        yield base, recorder[0]


def _wait_done(browser, timeout=240):
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, timeout).until(lambda b: b.find_element("tag name", "body").get_attribute("data-state")
                                          == "done")


def _keep(browser, tmp_path, name):
    shot = tmp_path / name
    assert browser.save_screenshot(str(shot))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTIFACTS / name)
    return Image.open(shot)


def _fresh_page_with_photo(browser, base, tmp_path, size, shown):
    """The page loaded afresh, its model name in, a demo photo of `size` picked (the page says `shown`);
    returns a find-by-id."""
    from selenium.webdriver.support.ui import WebDriverWait
    browser.get(base + "/")
    by_id = lambda i: browser.find_element("id", i)   # noqa: E731
    WebDriverWait(browser, 30).until(lambda b: by_id("model").text == "tiny")
    photo = tmp_path / "photo.png"
    demo_image(448).resize(size).save(photo)
    by_id("file").send_keys(str(photo))
    WebDriverWait(browser, 30).until(lambda b: shown in by_id("imageinfo").text)
    return by_id


def test_upload_ask_stream_timings_thinking_and_key(browser, site, tmp_path):
    from selenium.webdriver.support.ui import Select
    base, recorder = site
    by_id = _fresh_page_with_photo(browser, base, tmp_path, (1600, 1200), "sent as 1344×1008")
    by_id("question").send_keys("What is in this picture?")
    Select(by_id("slices")).select_by_value("2")
    by_id("maxtokens").clear()
    by_id("maxtokens").send_keys("24")
    by_id("extrabox").click()
    by_id("extra").send_keys('{"seed": 1}')      # the random model's answer, the same every run
    by_id("ask").click()
    _wait_done(browser)

    assert by_id("status").text.startswith("done"), by_id("status").text
    assert by_id("answer").text.strip(), "no answer text"
    assert int(browser.execute_script("return document.body.dataset.chunks")) >= 2   # it arrived in pieces
    bar = browser.execute_script("""const b = document.getElementById('bar');
        return {width: b.getBoundingClientRect().width,
                parts: [...b.children].map(d => [d.dataset.stage, d.getBoundingClientRect().width])};""")
    widths = dict(bar["parts"])
    assert list(widths) == ["preprocess", "vision", "resampler", "prefill", "decode"]
    assert abs(sum(widths.values()) - bar["width"]) < 2 and bar["width"] > 100      # the bar is filled
    assert sum(w > 0 for w in widths.values()) >= 3
    assert by_id("cachehit").get_attribute("hidden") is not None                  # first sight of the image

    sent = json.loads(recorder.requests[-1]["body"])
    assert sent["stream"] is True and sent["model"] == "tiny" and sent["max_tokens"] == 24
    assert sent["max_slices"] == 2 and sent["chat_template_kwargs"] == {"enable_thinking": False}
    assert sent["seed"] == 1
    assert "authorization" not in recorder.requests[-1]["headers"]
    url = sent["messages"][0]["content"][0]["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (1344, 1008)  # shrunk in the page
    _keep(browser, tmp_path, "page.png")

    # thinking on, an API key given: reasoning folded, the same image now a cache hit, the key sent as a bearer
    by_id("thinking").click()
    by_id("apikey").send_keys("sekret")
    by_id("ask").click()
    _wait_done(browser)
    assert by_id("status").text.startswith("done"), by_id("status").text
    sent = recorder.requests[-1]
    body = json.loads(sent["body"])
    assert sent["headers"]["authorization"] == "Bearer sekret"
    assert body["model"] == "tiny-thinking" and body["chat_template_kwargs"] == {"enable_thinking": True}
    box = by_id("reasoningbox")
    assert box.get_attribute("hidden") is None and box.get_attribute("open") is None   # shown, folded
    assert browser.execute_script("return document.getElementById('reasoning').textContent").strip()
    assert by_id("cachehit").get_attribute("hidden") is None and "cache hit" in by_id("cachehit").text


# Answers the page's parser must read exactly as runtime/grounding.py does (offsets are UTF-16 units in the
# page, code points in Python: the same for these texts, which stay inside the BMP).
AGREEMENT_CASES = [
    "Here: <ref>cat</ref><box>100 200 300 400</box> and <ref>dog</ref><box>500 500 900 1000</box>.",
    "<ref>cups</ref><box>1 2 3 4</box>, <box>5 6 7 8</box> <box>10 20 30 40 50 60 70 80</box>",
    "<ref>cup</ref> is at <box>1 2 3 4</box>",
    "<point>500 250</point> <quad>10 10 90 10 90 90 10 90</quad> <box>(10,20),(30,40)</box> <box>[3, 4, 1, 2]</box>",
    "<box>1 2 3</box> <box>0 0 1001 5</box> <box>-1 0 5 5</box> <box>1.5 2 3 4</box> <box>1 2 3 4</quad>",
    "<box>1 2 <box>3 4 5 6</box> <ref>a <ref>b</ref></ref><box>1 2 3 4</box> <ref>cat<box>1 2 3 4</box>",
    "<ref>" + "x" * 300 + "</ref><box>1 2 3 4</box> <box>" + "1 " * 100 + "</box>",
    "<ref>中文标签</ref><point>0 1000</point>\n<ref>two\nlines</ref><box>1 2 3 4</box>",
    "<ref>cat</ref><box>100 200 300 400</box> <ref>dog</ref><box>500 500 9",
    "text then <bo",
    "<ref>red cup</ref><box>12 34 560 780</box></bo",
]


def test_page_parser_agrees_with_the_runtime(browser, site):
    base, _ = site
    if not browser.current_url.startswith(base):
        browser.get(base + "/")
    for text in AGREEMENT_CASES:
        got = browser.execute_script("const g = minicpmv.parseGrounding(arguments[0], arguments[1]);"
                                     "return [g.objects, g.safeEnd];", text, True)
        want = [{"kind": o.kind, "label": o.label, "coords": list(o.coords), "start": o.start, "end": o.end}
                for o in parse(text)]
        assert got[0] == want, text
        stream = GroundingStream()
        stream.feed(text)
        held = browser.execute_script("return minicpmv.parseGrounding(arguments[0], false).safeEnd;", text)
        assert held == stream.safe_end, text


def test_page_draws_boxes_and_points_on_the_canvas(browser, site, tmp_path):
    """A known answer through the page's own parse + draw: the box edge and the point take their colours at the
    hand-computed canvas pixels, the inside of the box keeps the picture, the tags show as chips."""
    base, _ = site
    if not browser.current_url.startswith(base):
        browser.get(base + "/")
    photo = tmp_path / "photo.png"
    demo_image(448).resize((1000, 750)).save(photo)
    browser.find_element("id", "file").send_keys(str(photo))
    from selenium.webdriver.support.ui import WebDriverWait
    WebDriverWait(browser, 30).until(lambda b: "1000×750" in b.find_element("id", "imageinfo").text)
    answer = "The <ref>cat</ref><box>100 200 500 600</box> sits by the <point>800 300</point>."
    px = browser.execute_script("""
        const view = document.getElementById('view'), ctx = view.getContext('2d');
        const at = (x, y) => [...ctx.getImageData(x, y, 1, 1).data.slice(0, 3)];
        const inside = at(300, 300);
        const objects = minicpmv.renderAnswer(document.getElementById('answer'), arguments[0], true);
        minicpmv.drawObjects(objects);
        return {size: [view.width, view.height], objects, insideBefore: inside, insideAfter: at(300, 300),
                edge: at(100, 300), point: at(800, 225), chips: document.querySelectorAll('#answer .shape').length,
                ref: document.querySelector('#answer .ref').textContent,
                text: document.getElementById('answer').textContent};""", answer)
    # canvas 1000 x 750: the box spans x 100..500, y 150..450 (lines max(2, round(750 / 200)) = 4 px wide),
    # the point is at (800, 225)
    assert px["size"] == [1000, 750]
    assert [(o["kind"], o["label"], o["coords"]) for o in px["objects"]] == [
        ("box", "cat", [100, 200, 500, 600]), ("point", None, [800, 300])]
    assert px["edge"] == [230, 25, 75]                      # first colour, as in runtime/grounding.py
    assert px["point"] == [60, 180, 75]                     # second colour (unlabelled)
    assert px["insideAfter"] == px["insideBefore"]
    assert px["chips"] == 2 and px["ref"] == "cat" and "<box>" not in px["text"] and "<ref>" not in px["text"]
    _keep(browser, tmp_path, "page-boxes.png")


# The structured-output constraint (response_format json_schema) forces the whole answer to be one JSON string
# that is a labelled box; the corners are held to x1, y1 in 100..399 and x2, y2 in 600..999 so the box is big
# enough to probe its edges. The tiny random model never writes a box by itself: every box here is the grammar's.
BOX_PATTERN = r"^<ref>[a-z]{1,8}</ref><box>[1-3][0-9]{2} [1-3][0-9]{2} [6-9][0-9]{2} [6-9][0-9]{2}</box>$"


def _final_chunk(sse: bytes) -> dict:
    events = [json.loads(line[6:]) for line in sse.decode().split("\n")
              if line.startswith("data: ") and line != "data: [DONE]"]
    return next(e for e in reversed(events) if "timings" in e)


def test_an_answer_forced_into_a_box_is_drawn(browser, site, tmp_path):
    """Through the page's own request path: the response_format typed into "extra request fields" reaches the
    server, the grammar makes the answer a box, and the page draws it where runtime/grounding.py (the server's
    `boxes`) says: the box's colour on its left and right edges and on its label tag, the picture inside it."""
    base, recorder = site
    by_id = _fresh_page_with_photo(browser, base, tmp_path, (800, 600), "800×600")   # no thinking, no key
    by_id("question").send_keys("Where is the red disc? Answer with a box.")
    by_id("maxtokens").clear()
    by_id("maxtokens").send_keys("60")
    by_id("extrabox").click()                    # unfold "extra request fields"
    n_sent = len(recorder.requests)
    by_id("extra").send_keys('{"seed": 3,')     # not JSON: refused in the page, nothing sent
    by_id("ask").click()
    assert "extra request fields: not valid JSON" in by_id("status").text
    assert len(recorder.requests) == n_sent
    fmt = {"type": "json_schema", "json_schema": {"name": "box", "strict": True,
                                                  "schema": {"type": "string", "pattern": BOX_PATTERN}}}
    by_id("extra").clear()
    by_id("extra").send_keys(json.dumps({"seed": 3, "response_format": fmt}))
    by_id("ask").click()
    _wait_done(browser)
    assert by_id("status").text.startswith("done (stop)"), by_id("status").text

    sent = json.loads(recorder.requests[-1]["body"])
    assert sent["response_format"] == fmt and sent["seed"] == 3 and sent["stream"] is True
    assert sent["max_tokens"] == 60 and sent["messages"][0]["content"][0]["type"] == "image_url"
    final = _final_chunk(recorder.requests[-1]["response"])
    [box] = final["boxes"]                                   # the server's parser: one box, on the sent image
    print(f"\nforced answer {by_id('answer').text!r}; server box {box}")
    assert box["kind"] == "box" and box["image"] == 0
    x1, y1, x2, y2 = box["pixels"]
    assert [round(v, 2) for v in (box["coords"][0] * 0.8, box["coords"][1] * 0.6, box["coords"][2] * 0.8,
                                  box["coords"][3] * 0.6)] == box["pixels"]   # 800 x 600 sent, 0-1000 scale

    # the page: the label as a ref, one box chip titled with its coordinates
    assert browser.find_element("css selector", "#answer .ref").text == box["label"]
    chips = browser.find_elements("css selector", "#answer .shape")
    assert [(c.text, c.get_attribute("title")) for c in chips] == [("box 1", " ".join(map(str, box["coords"])))]
    # the canvas (800 x 600, one pixel per image pixel): lines max(2, round(600 / 200)) = 3 px wide centred on
    # the edges; the label tag (20 px font + 4) sits above the top-left corner, its first 3 px plain colour
    px = browser.execute_script("""
        const view = document.getElementById('view'), ctx = view.getContext('2d');
        const at = ([x, y]) => [...ctx.getImageData(x, y, 1, 1).data.slice(0, 3)];
        const probes = arguments[0], drawn = probes.map(at);
        minicpmv.drawObjects([]);                          // the picture alone, to compare with
        const bare = probes.map(at);
        return {size: [view.width, view.height], drawn, bare};""",
        [[int(x1), int((y1 + y2) / 2)], [int(x2), int((y1 + y2) / 2)], [int(x1) + 2, int(y1) - 23],
         [int((x1 + x2) / 2), int((y1 + y2) / 2)]])
    assert px["size"] == [800, 600]
    red = [230, 25, 75]                                       # the first label colour, as in runtime/grounding.py
    left, right, tag, inside = zip(px["drawn"], px["bare"])
    assert left[0] == right[0] == tag[0] == red, px
    assert red not in (left[1], right[1], tag[1]), px          # the colour came from the drawing, not the picture
    assert inside[0] == inside[1]                             # inside the box, the picture is untouched
    browser.execute_script("minicpmv.drawObjects(arguments[0]);", [
        {"kind": "box", "label": box["label"], "coords": box["coords"]}])       # back as it was, for the shot
    _keep(browser, tmp_path, "page-forced-box.png")
