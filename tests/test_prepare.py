"""Prepare ahead (#18): an image encoded and prefilled before the question, from Python (`prepare_image`) and over
HTTP (POST /v1/images + an image_handle part). The question then prefills only itself, runs no vision, and greedy
decoding gives exactly the tokens of a cold run."""
from __future__ import annotations

import base64
import io

import httpx
import pytest

import minicpmv_edge
from minicpmv_edge.workflows.demo import demo_image

QUESTION = "What is in this picture?"


@pytest.fixture(scope="module")
def model(tiny_bundle):
    m = minicpmv_edge.load(tiny_bundle("4.5"), llm="Q4_K_M")
    yield m
    m.close()


def _ask(model, image, question=QUESTION):
    return model.chat([{"role": "user", "content": [image, question]}], greedy=True, max_tokens=24)


def test_prepared_image_then_question_gives_the_cold_tokens_without_vision(model):
    _check_prepared_equals_cold(model)


def test_prepared_image_on_2_6_with_a_system_message(tiny_bundle):
    m = minicpmv_edge.load(tiny_bundle("2.6"), llm="Q4_K_M")
    try:
        _check_prepared_equals_cold(m, system="You are terse.")
    finally:
        m.close()


def _check_prepared_equals_cold(model, system=None):
    image, other = demo_image(600), demo_image(448).rotate(90)
    head = [{"role": "system", "content": system}] if system else []

    def _ask(model, image, question=QUESTION):
        return model.chat(head + [{"role": "user", "content": [image, question]}], greedy=True, max_tokens=24)
    model.forget()
    cold = _ask(model, image)
    model.forget()
    estimate = model.image_tokens(image)
    prepared = model.prepare_image(image, system=system)
    assert prepared.timings.slices == prepared.slices > 1 and prepared.timings.vision > 0
    assert prepared.image_tokens == estimate
    kv_after_prepare = model.decoder.n_past
    warm = _ask(model, prepared)
    t = warm.timings
    print(f"\ncold: {cold.timings.prompt_tokens} prompt tokens, all prefilled, {cold.timings.slices} slices; "
          f"prepared: {prepared.prefilled_tokens} positions ahead, then {t.prefilled_tokens} for the question, "
          f"{t.slices} slices; identical tokens: {warm.token_ids == cold.token_ids}")
    assert warm.token_ids == cold.token_ids and len(cold.token_ids) > 0
    assert t.vision == 0 and t.slices == 0 and t.preprocess < cold.timings.preprocess + 1
    assert t.prompt_tokens == cold.timings.prompt_tokens
    assert t.prefilled_tokens == t.prompt_tokens - kv_after_prepare > 0     # the question's positions only
    # another conversation took the KV cache: the handle still skips the ViT and still gives the cold tokens
    _ask(model, other, "Describe it.")
    again = _ask(model, prepared)
    assert again.token_ids == cold.token_ids and again.timings.slices == 0
    assert again.timings.prefilled_tokens > t.prefilled_tokens


def test_image_token_estimate_is_the_prompt_growth_per_image(model):
    image = demo_image(600)
    one = model.prepare([{"role": "user", "content": [image, QUESTION]}])
    two = model.prepare([{"role": "user", "content": [image, image, QUESTION]}])
    positions = [sum(len(s) if isinstance(s, list) else s.rows.shape[0] for s in segs) for segs in (one, two)]
    # the second image adds its placeholder and one "\n" between the two (parts are joined by newlines)
    assert positions[1] - positions[0] == model.image_tokens(image) + 1
    assert model.image_tokens(image, max_slices=1) < model.image_tokens(image)


# ------------------------------------------------------------------------------------------------ HTTP

def _data_url(img) -> str:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def server(model):
    from loopback import serve_app
    from minicpmv_edge.runtime.server import ServerOptions, create_app
    opts = ServerOptions(name="tiny", max_image_handles=2)
    with serve_app(create_app(model, opts), opts) as base:
        yield base


def _chat(base, part) -> dict:
    r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]}],
        "temperature": 0, "max_tokens": 16, "seed": 1})
    assert r.status_code == 200, r.text
    return r.json()


def test_http_image_handle_answers_like_the_image_and_skips_vision(server, model):
    url = _data_url(demo_image(600))
    cold = _chat(server, {"type": "image_url", "image_url": {"url": url}})
    model.forget()         # (the worker is idle between requests) the handle's image must be encoded afresh
    r = httpx.post(server + "/v1/images", json={"image": url}, timeout=120)
    assert r.status_code == 200, r.text
    made = r.json()
    assert made["id"].startswith("img_") and made["estimated_image_tokens"] == made["image_tokens"] > 0
    assert made["slices"] > 1 and made["timings"]["vision"] > 0
    warm = _chat(server, {"type": "image_handle", "image_handle": made["id"]})
    assert warm["choices"][0]["message"]["content"] == cold["choices"][0]["message"]["content"]
    assert warm["timings"]["slices"] == 0 and warm["timings"]["vision"] == 0
    assert warm["timings"]["prompt_tokens"] == cold["timings"]["prompt_tokens"]
    assert warm["timings"]["prefilled_tokens"] == warm["timings"]["prompt_tokens"] - made["prefilled_tokens"]
    assert made["prefilled_tokens"] > made["image_tokens"]     # the template's head and the image, done ahead


def test_http_handle_errors_are_400_naming_the_handle(server):
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_handle", "image_handle": "img_nope"}, {"type": "text", "text": "Hi"}]}]})
    assert r.status_code == 400 and "img_nope" in r.text and "messages[0].content[0].image_handle" in r.text
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_handle", "image_handle": 7}]}]})
    assert r.status_code == 400 and "image_handle must be a string" in r.text
    r = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "assistant", "content": [
        {"type": "image_handle", "image_handle": "img_x"}]}]})
    assert r.status_code == 400 and "only accepted in user messages" in r.text
    for body, field in (({}, "'image' is required"), ({"image": "data:image/png;base64,AAAA"}, "image"),
                        ({"image": _data_url(demo_image(64)), "max_slices": 99}, "max_slices")):
        r = httpx.post(server + "/v1/images", json=body, timeout=60)
        assert r.status_code == 400 and field in r.json()["error"]["message"], (body, r.text)


def test_http_handles_are_capped_least_recently_used_first(server):
    ids = []
    for size in (200, 260, 320):          # the server keeps 2
        r = httpx.post(server + "/v1/images", json={"image": _data_url(demo_image(size)), "max_slices": 1},
                       timeout=120)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    dropped = httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": [
        {"type": "image_handle", "image_handle": ids[0]}]}], "max_tokens": 1})
    assert dropped.status_code == 400 and ids[0] in dropped.text
    kept = _chat(server, {"type": "image_handle", "image_handle": ids[2]})
    assert kept["timings"]["slices"] == 0
