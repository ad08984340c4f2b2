"""Chat with images through ``pagedllm serve`` (tiny random Qwen2-VL) and the openai client:
base64 data URLs, the same reply as the offline API, limits, media policy and bad images."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import openai
import pytest
from PIL import Image

from pagedllm import LLM, SamplingParams
from tests.engine.test_vision_language import random_image
from tests.entrypoints.conftest import MAX_MODEL_LEN, Server, launch_server


def data_url(image: Image.Image, fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buffer.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


@pytest.fixture(scope="module")
def vl_server(tiny_qwen2_vl_dir, tmp_path_factory) -> Iterator[Server]:
    media = tmp_path_factory.mktemp("media")
    random_image(84, 112, 5).save(media / "cat.png")
    with launch_server(tiny_qwen2_vl_dir, "--limit-mm-per-prompt", '{"image": 2}',
                       "--allowed-local-media-path", str(media)) as running:
        running.media = media  # type: ignore[attr-defined]
        yield running


def test_chat_with_a_base64_image_matches_the_offline_api(vl_server, tiny_qwen2_vl_dir):
    image = random_image(224, 224, 1)
    messages = user(image_part(data_url(image)), {"type": "text", "text": "What is this?"})
    reply = vl_server.client().chat.completions.create(
        model="", messages=messages, max_tokens=8, temperature=0.0,
        extra_body={"ignore_eos": True})
    llm = LLM(tiny_qwen2_vl_dir, kv_cache_memory_bytes=64 * 2**20, max_model_len=MAX_MODEL_LEN)
    offline = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0]
    assert reply.choices[0].message.content == offline.outputs[0].text
    # 64 image tokens (224 x 224) plus the template's text
    assert reply.usage.prompt_tokens == len(offline.prompt_token_ids) > 64
    assert reply.usage.completion_tokens == 8


def test_streaming_with_images_and_a_local_file(vl_server):
    messages = user(image_part(f"file://{vl_server.media}/cat.png"),
                    image_part(data_url(random_image(56, 56, 2), "JPEG")),
                    {"type": "text", "text": "Compare them."})
    stream = vl_server.client().chat.completions.create(
        model="", messages=messages, max_tokens=6, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[-1].usage.completion_tokens == 6
    assert any(c.choices and c.choices[0].finish_reason == "length" for c in chunks)


@pytest.mark.parametrize("parts, message", [
    ([image_part(data_url(random_image(56, 56, i))) for i in range(3)], "At most 2 image"),
    ([image_part("data:image/png;base64,bm90IGFuIGltYWdl")], "image"),
    ([image_part("data:image/png;base64,@@@")], "base64"),
    ([image_part("file:///etc/passwd")], "allowed"),
    ([image_part("http://example.com/cat.png")], "domain"),
    ([image_part("ftp://example.com/cat.png")], ""),
    ([{"type": "image_url", "image_url": {}}], "url"),
    ([{"type": "input_audio", "input_audio": {}}], "not supported"),
])
def test_bad_images_are_400s_and_the_server_survives(vl_server, parts, message):
    client = vl_server.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="", messages=user(*parts), max_tokens=2)
    assert message.lower() in str(err.value).lower()
    ok = client.chat.completions.create(model="", messages=user(
        {"type": "text", "text": "Hi"}), max_tokens=2)
    assert ok.choices[0].finish_reason in ("length", "stop")


def test_tokenize_counts_image_tokens(vl_server):
    import httpx

    body = {"messages": user(image_part(data_url(random_image(448, 448, 3))))}
    count = httpx.post(vl_server.url + "/tokenize", json=body, headers=vl_server.auth,
                       timeout=60).json()["count"]
    text_only = httpx.post(vl_server.url + "/tokenize", headers=vl_server.auth, timeout=60,
                           json={"messages": user({"type": "text", "text": ""})}).json()["count"]
    assert count - text_only == 256 + 2  # 448 x 448 = 256 tokens, plus vision start/end


def test_a_text_model_refuses_images(server):
    with pytest.raises(openai.BadRequestError, match="does not take image"):
        server.client().chat.completions.create(model="", max_tokens=2, messages=user(
            image_part(data_url(random_image(56, 56, 0)))))
