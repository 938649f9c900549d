"""Grounding spans -> boxes: the parser (malformed input, chunked streams), pixel positions on EXIF-rotated and
resized images checked against hand-computed ones, `--draw`, and the wiring through model.chat, `run --json`
and the server, with the model's answer scripted (a tiny random model never writes a box by itself)."""
from __future__ import annotations

import contextlib
import io
import json
import random

import httpx
import pytest
from PIL import Image, ImageOps

import minicpmv_edge
from minicpmv_edge.runtime.grounding import GroundingStream, ImageGeometry, draw, parse


def _summary(objects):
    return [(o.kind, o.label, o.coords, o.start, o.end) for o in objects]


# ------------------------------------------------------------------------------------------------ the parser

def test_several_labelled_boxes_and_their_spans():
    text = "Here: <ref>cat</ref><box>100 200 300 400</box> and <ref>dog</ref><box>500 500 900 1000</box>."
    objs = parse(text)
    assert _summary(objs) == [("box", "cat", (100, 200, 300, 400), 20, 46),
                              ("box", "dog", (500, 500, 900, 1000), 65, 92)]
    assert text[objs[0].start:objs[0].end] == "<box>100 200 300 400</box>"
    assert all(o.image is None and o.pixels is None for o in objs)   # no image given: coords only


def test_one_label_for_several_boxes_and_several_boxes_in_one_tag():
    objs = parse("<ref>cups</ref><box>1 2 3 4</box>, <box>5 6 7 8</box> <box>10 20 30 40 50 60 70 80</box>")
    assert [(o.label, o.coords) for o in objs] == [("cups", (1, 2, 3, 4)), ("cups", (5, 6, 7, 8)),
                                                  ("cups", (10, 20, 30, 40)), ("cups", (50, 60, 70, 80))]
    # a label names only the shapes right after it: text in between ends it
    objs = parse("<ref>cup</ref> is at <box>1 2 3 4</box>; <box>5 6 7 8</box>")
    assert [o.label for o in objs] == [None, None]


def test_points_quads_and_the_number_formats_models_write():
    objs = parse("<point>500 250</point> <quad>10 10 90 10 90 90 10 90</quad> <box>(10,20),(30,40)</box> "
                 "<box>[300, 400, 100, 200]</box> <ref>中文</ref><point>0 1000</point>")
    assert [(o.kind, o.label, o.coords) for o in objs] == [
        ("point", None, (500, 250)), ("quad", None, (10, 10, 90, 10, 90, 90, 10, 90)),
        ("box", None, (10, 20, 30, 40)), ("box", None, (100, 200, 300, 400)),   # corners put in order
        ("point", "中文", (0, 1000))]


@pytest.mark.parametrize("text", [
    "<box>1 2 3</box>",                       # 3 numbers
    "<box>1 2 3 4 5</box>",                   # not a multiple of 4
    "<point>1 2 3</point>",
    "<quad>1 2 3 4</quad>",
    "<box>0 0 1001 5</box>",                  # over the 0-1000 scale
    "<box>-1 0 5 5</box>",                    # negative
    "<box>1.5 2 3 4</box>",                   # not integers
    "<box>a b c d</box>",
    "<box></box>",
    "<box>1 2 3 4</quad>",                    # wrong closing tag
    "<box>1 2 3 4",                           # never closed
    "<box>1 2 3 4</bo",                       # closing tag cut off
    "</box>1 2 3 4</box>",                    # stray closing tag
    "<BOX>1 2 3 4</BOX>",                     # tags are case-sensitive tokens
    "<box>" + "1 " * 100 + "</box>",          # body over the length limit
    "<box>1 2\x003 4</box>",
])
def test_malformed_spans_stay_text(text):
    assert parse(text) == []
    stream = GroundingStream()
    assert [o for ch in text for o in stream.feed(ch)] + stream.close() == []


def test_nested_and_broken_spans_keep_the_valid_inner_ones():
    # an outer span broken by an inner tag: the outer is text, the inner still counts
    assert _summary(parse("<box>1 2 <box>3 4 5 6</box>")) == [("box", None, (3, 4, 5, 6), 9, 27)]
    # a label broken by a nested <ref>: the inner ref is complete, but the stray </ref> ends its reach
    assert [(o.label, o.coords) for o in parse("<ref>a <ref>b</ref></ref><box>1 2 3 4</box>")] == [(None, (1, 2, 3, 4))]
    # an unclosed ref (its body would run into the box) labels nothing, the box after it still counts
    assert [(o.label, o.coords) for o in parse("<ref>cat<box>1 2 3 4</box>")] == [(None, (1, 2, 3, 4))]
    # a ref over the label limit is text
    assert [o.label for o in parse("<ref>" + "x" * 300 + "</ref><box>1 2 3 4</box>")] == [None]
    # a shape tag inside a label
    assert [o.label for o in parse("<ref>a<point>1 2</point></ref><box>1 2 3 4</box>")] == [None, None]


def test_truncated_answer_gives_the_complete_spans_only():
    text = "<ref>cat</ref><box>100 200 300 400</box> <ref>dog</ref><box>500 500 9"
    assert [o.label for o in parse(text)] == ["cat"]
    stream = GroundingStream()
    got = stream.feed(text)
    assert [o.label for o in got] == ["cat"] and stream.close() == []
    assert stream.safe_end == len(text)   # closed: nothing is held any more
    held = GroundingStream()
    held.feed(text)
    assert held.safe_end == text.index("<box>500")   # while streaming, the unfinished box is held back


_STREAM_TEXT = ("A <ref>red cup</ref><box>12 34 560 780</box>, <box>1 2 3 4</box> then <point>5 6</point> and "
                "<quad>1 2 3 4 5 6 7 8</quad> <box>1 2 3</box> <ref>x</ref> <bo <box>9 9 9 9</box></box> "
                "<ref>中文标签</ref><box>0 0 1000 1000</box> <")


def test_stream_equals_parse_for_every_two_and_three_chunk_cut():
    whole = _summary(parse(_STREAM_TEXT))
    assert len(whole) == 6
    n = len(_STREAM_TEXT)
    for i in range(n + 1):
        s = GroundingStream()
        got = s.feed(_STREAM_TEXT[:i]) + s.feed(_STREAM_TEXT[i:]) + s.close()
        assert _summary(got) == whole, f"cut at {i}"
    for i in range(0, n + 1, 3):
        for j in range(i, n + 1, 5):
            s = GroundingStream()
            got = s.feed(_STREAM_TEXT[:i]) + s.feed(_STREAM_TEXT[i:j]) + s.feed(_STREAM_TEXT[j:]) + s.close()
            assert _summary(got) == whole, f"cuts at {i}, {j}"


def test_stream_returns_each_object_when_its_closing_tag_arrives():
    s = GroundingStream()
    text = "<ref>cat</ref><box>1 2 3 4</box>"
    out = [s.feed(ch) for ch in text]
    assert [len(o) for o in out] == [0] * (len(text) - 1) + [1]


def test_random_soup_never_raises_and_streams_the_same():
    rng = random.Random(0)
    pieces = ["<ref>", "</ref>", "<box>", "</box>", "<point>", "</point>", "<quad>", "</quad>", "<", ">", "/",
              " ", ",", "(", ")", "1", "23", "999", "1000", "1001", "a", "\n", "猫", "<bo", "x>",
              "<box>1 2 3 4</box>", "<point>5 6</point>", "<ref>a cat</ref>", "<quad>1 2 3 4 5 6 7 8</quad>"]
    total = 0
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 60)))
        whole = parse(text)
        total += len(whole)
        s = GroundingStream()
        got, at = [], 0
        while at < len(text):
            step = rng.randrange(1, 8)
            got += s.feed(text[at:at + step])
            at += step
        got += s.close()
        assert _summary(got) == _summary(whole), text
        for o in whole:   # every object is a real span of the text
            assert text[o.start:o.end].startswith(f"<{o.kind}>") and text[o.start:o.end].endswith(f"</{o.kind}>")
    assert total > 50   # the soup did contain valid spans


# ------------------------------------------------------------------------------------------------ pixels

def test_pixels_on_a_resized_image_by_hand():
    # 1234 x 567, as stored, no EXIF: x * 1234 / 1000, y * 567 / 1000
    geo = ImageGeometry(1234, 567)
    [box, point] = parse("<box>100 200 300 400</box><point>500 1000</point>", [geo])
    assert box.image == 0 and box.pixels == (123.4, 113.4, 370.2, 226.8) and box.stored_pixels == box.pixels
    assert point.pixels == (617.0, 567.0)


def test_pixels_on_an_exif_rotated_photo_by_hand():
    # a phone photo stored 400 x 300 with orientation 6 (turn 90 degrees clockwise to view): viewers show 300 x 400
    geo = ImageGeometry(400, 300, 6)
    assert geo.upright_size == (300, 400)
    [box] = parse("<box>100 250 500 750</box>", [geo])
    assert box.pixels == (30.0, 100.0, 150.0, 300.0)          # on the upright 300 x 400 picture
    # stored grid: upright (u, v) comes from stored (v, 300 - u): corners (100, 270) and (300, 150)
    assert box.stored_pixels == (100.0, 150.0, 300.0, 270.0)
    [pt] = parse("<point>100 250</point>", [ImageGeometry(400, 300, 8)])   # orientation 8: stored (400 - v, u)
    assert pt.pixels == (30.0, 100.0) and pt.stored_pixels == (300.0, 30.0)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_pixels_hit_the_same_spot_as_pillow_exif_transpose(orientation):
    """A marked pixel found in the upright image (what the model sees), mapped back with to_stored, must land on
    the marked pixel of the stored grid: checks the orientation table against Pillow, all eight cases."""
    stored = Image.new("RGB", (40, 30), (0, 0, 0))
    stored.putpixel((5, 7), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif.tobytes())
    img = Image.open(io.BytesIO(buf.getvalue()))
    geo = ImageGeometry.of(img)
    assert geo.orientation == orientation
    upright = ImageOps.exif_transpose(img)
    assert upright.size == geo.upright_size
    [(u, v)] = [(x, y) for x in range(upright.width) for y in range(upright.height)
                if upright.getpixel((x, y))[0] > 128]
    assert geo.to_stored(u + 0.5, v + 0.5) == (5.5, 7.5)


def test_several_images_map_onto_the_last():
    a, b = ImageGeometry(100, 100), ImageGeometry(800, 600)
    [box] = parse("<box>0 0 500 500</box>", [a, b])
    assert box.image == 1 and box.pixels == (0.0, 0.0, 400.0, 300.0)


def test_bad_exif_orientation_reads_as_upright():
    img = Image.new("RGB", (10, 20))
    exif = Image.Exif()
    exif[0x0112] = 9
    buf = io.BytesIO()
    img.save(buf, "PNG", exif=exif.tobytes())
    assert ImageGeometry.of(Image.open(io.BytesIO(buf.getvalue()))) == ImageGeometry(10, 20, 1)


def test_draw_outlines_each_box_on_the_upright_image():
    stored = Image.new("RGB", (400, 300), (255, 255, 255))      # orientation 6: upright 300 x 400
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, "PNG", exif=exif.tobytes())
    img = Image.open(io.BytesIO(buf.getvalue()))
    objs = parse("<ref>cat</ref><box>100 250 500 750</box><point>900 100</point>", [ImageGeometry.of(img)])
    out = draw(img, objs)
    assert out.size == (300, 400)
    assert out.getpixel((90, 300)) == (230, 25, 75)            # bottom edge of the box (30,100)-(150,300)
    assert out.getpixel((90, 200)) == (255, 255, 255)          # inside: untouched
    assert out.getpixel((270, 40)) != (255, 255, 255)          # the point, at (270, 40)
    assert any(out.getpixel((x, y)) == (230, 25, 75) for x in range(30, 60) for y in range(80, 100))  # label tag


# ------------------------------------------------------------------------------------------------ wiring

@contextlib.contextmanager
def scripted_answer(model, answer: str):
    """Make the model 'write' `answer`: the prompt is really prefilled, then the answer's tokens come out
    as if sampled. Tests the path from tokens to boxes without hoping a random model writes a box."""
    ids = model.decoder.tokenize(answer, add_special=False, parse_special=True)
    real = model.decoder.generate

    def generate(segments, *, max_tokens, stop_ids=(), **sampling):   # sampling= or sampler=, as the caller has it
        for _ in real(segments, max_tokens=1, stop_ids=stop_ids, **sampling):
            pass
        yield from ids[:max_tokens]

    model.decoder.generate = generate
    try:
        yield ids
    finally:
        model.decoder.generate = real


ANSWER = "The <ref>cat</ref><box>100 250 500 750</box> and a <ref>bell</ref><point>500 500</point>."


@pytest.fixture(scope="module")
def model_45(tiny_bundle):
    m = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    yield m
    m.close()


def _rotated_jpeg(size=(800, 600), orientation=6) -> bytes:
    from minicpmv_edge.workflows.demo import demo_image
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    demo_image(max(size)).resize(size).save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_chat_returns_boxes_in_pixels_of_the_original_rotated_image(model_45):
    """The grounding tokens are special tokens: they must reach the text (llama.cpp hides specials by default),
    and the boxes must land on the original 800x600 photo shown upright (600x800), whatever the slicing did."""
    photo = _rotated_jpeg()
    msgs = [{"role": "user", "content": [{"type": "image", "image": photo}, {"type": "text", "text": "Where?"}]}]
    with scripted_answer(model_45, ANSWER) as ids:
        # <ref> </ref> <box> </box> are single special tokens here (4.5 has no <point> token: that one is text),
        # and llama.cpp leaves special tokens out of the text unless asked
        used = set(ids) & model_45._grounding_ids
        assert len(used) == 4 and all(model_45.decoder.token_bytes(i) == b"" for i in used)
        events = list(model_45.chat(msgs, stream=True, max_slices=4, max_tokens=200))
    result = events[-1].result
    assert result.text == ANSWER and result.timings.slices > 1
    assert [(b.kind, b.label, b.image, b.pixels) for b in result.boxes] == [
        ("box", "cat", 0, (60.0, 200.0, 300.0, 600.0)), ("point", "bell", 0, (300.0, 400.0))]
    assert result.boxes[0].stored_pixels == (200.0, 300.0, 600.0, 540.0)   # stored (v, 600 - u)
    streamed = [b for ev in events for b in ev.boxes]
    assert _summary(streamed) == _summary(result.boxes)


def test_chat_boxes_refer_to_the_last_of_several_images(model_45):
    from minicpmv_edge.workflows.demo import demo_image
    msgs = [{"role": "user", "content": [{"type": "image", "image": demo_image(448)},
                                         {"type": "image", "image": demo_image(448).resize((1000, 200))},
                                         {"type": "text", "text": "Where?"}]}]
    with scripted_answer(model_45, ANSWER):
        result = model_45.chat(msgs, max_slices=1, max_tokens=200)
    assert [(b.image, b.pixels) for b in result.boxes] == [(1, (100.0, 50.0, 500.0, 150.0)), (1, (500.0, 100.0))]


def test_run_json_and_draw(model_45, tiny_bundle, tmp_path, monkeypatch, capsys):
    from minicpmv_edge.runtime import cli
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(_rotated_jpeg())
    out = tmp_path / "drawn.png"
    monkeypatch.setattr(cli, "_load", lambda args: model_45)
    with scripted_answer(model_45, ANSWER):
        assert cli.run_main([str(tiny_bundle("4.5")), "--image", str(photo), "-p", "Where?", "--json",
                             "--max-slices", "2", "--draw", str(out)]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["answer"] == ANSWER
    assert [(b["kind"], b["label"], b["coords"], b["pixels"]) for b in got["boxes"]] == [
        ("box", "cat", [100, 250, 500, 750], [60.0, 200.0, 300.0, 600.0]),
        ("point", "bell", [500, 500], [300.0, 400.0])]
    drawn = Image.open(out)
    assert drawn.size == (600, 800)                                    # upright, full size
    assert drawn.getpixel((180, 600)) == (230, 25, 75)                 # the cat box's bottom edge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["drawn.png", "photo.jpg"]   # no temp file left

    with scripted_answer(model_45, ANSWER):                            # the streaming path draws too
        assert cli.run_main([str(tiny_bundle("4.5")), "--image", str(photo), "-p", "Where?", "--max-slices", "1",
                             "--draw", str(tmp_path / "again.jpg")]) == 0
    assert "2 boxes/points drawn" in capsys.readouterr().err and Image.open(tmp_path / "again.jpg").size == (600, 800)

    from minicpmv_edge.errors import MiniCPMVEdgeError
    (tmp_path / "taken.png").mkdir()                                   # the target cannot be replaced
    with scripted_answer(model_45, ANSWER), pytest.raises(MiniCPMVEdgeError, match="taken.png: cannot write"):
        cli.run_main([str(tiny_bundle("4.5")), "--image", str(photo), "-p", "Where?", "--max-slices", "1", "--json",
                      "--draw", str(tmp_path / "taken.png")])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_run_draw_refuses_bad_targets_before_loading(tmp_path, monkeypatch):
    from minicpmv_edge.errors import MiniCPMVEdgeError
    from minicpmv_edge.runtime import cli
    monkeypatch.setattr(cli, "_load", lambda args: pytest.fail("loaded the model"))
    cases = [([], "out.png", "needs an --image"), (["x.png"], "out.gif", ".png or .jpg"),
             (["x.png"], "nodir/out.png", "does not exist")]
    for images, target, message in cases:
        argv = ["bundle", "-p", "hi", "--draw", str(tmp_path / target)] + [a for i in images for a in ("--image", i)]
        with pytest.raises(MiniCPMVEdgeError, match=message):
            cli.run_main(argv)


@contextlib.contextmanager
def serving(model, wrap=lambda app: app, **options):
    """The server on a free loopback port (its app passed through `wrap`); yields its URL."""
    from loopback import serve_app

    from minicpmv_edge.runtime.server import ServerOptions, create_app
    with serve_app(wrap(create_app(model, ServerOptions(name="tiny", **options)))) as base:
        yield base


def test_server_returns_boxes_plain_streamed_and_cut_by_a_stop_string(model_45):
    import base64
    url = "data:image/jpeg;base64," + base64.b64encode(_rotated_jpeg()).decode()
    body = {"model": "tiny", "max_tokens": 200, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Where?"}]}]}
    want = [("box", "cat", [100, 250, 500, 750], [60.0, 200.0, 300.0, 600.0]),
            ("point", "bell", [500, 500], [300.0, 400.0])]
    with serving(model_45) as base, scripted_answer(model_45, ANSWER):
        plain = httpx.post(base + "/v1/chat/completions", json=body, timeout=120).json()
        assert [(b["kind"], b["label"], b["coords"], b["pixels"]) for b in plain["boxes"]] == want
        chunks = []
        with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True}, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunks.append(json.loads(line[6:]))
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == ANSWER
        assert [c for c in chunks[:-1] if "boxes" in c] == []          # only the final chunk carries them
        assert [(b["kind"], b["label"], b["coords"], b["pixels"]) for b in chunks[-1]["boxes"]] == want
        cut = httpx.post(base + "/v1/chat/completions", json={**body, "stop": [" and a"]}, timeout=120).json()
        assert cut["choices"][0]["message"]["content"] == ANSWER[:ANSWER.index(" and a")]
        assert [b["label"] for b in cut["boxes"]] == ["cat"]           # the point after the stop string is gone
        page = httpx.get(base + "/", timeout=10)
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/v1/chat/completions" in page.text and "Content-Security-Policy" in page.headers
