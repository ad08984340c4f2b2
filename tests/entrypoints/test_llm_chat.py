"""``LLM.chat``: a batch of conversations gives what ``generate`` gives on the templated prompts."""

from __future__ import annotations

import pytest

from pagedllm import LLM, SamplingParams

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "Name a color."}],
    [{"role": "user", "content": "Say hello."},
     {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "Now say it in French. 你好 🙂"}],
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=256 * 2**20, max_model_len=1024)


def _templated(llm: LLM, conversation, add_generation_prompt: bool = True) -> list[int]:
    tok = llm.get_tokenizer()
    text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    return tok.encode(text, add_special_tokens=False)


def test_chat_batch_equals_generate_on_templated_prompts(llm):
    chats = llm.chat(CONVERSATIONS, GREEDY, use_tqdm=False)
    tok = llm.get_tokenizer()
    texts = [tok.apply_chat_template(c, add_generation_prompt=True) for c in CONVERSATIONS]
    for text, conversation in zip(texts, CONVERSATIONS):
        assert text.endswith("<|im_start|>assistant\n")
        assert conversation[-1]["content"] in text
    gens = llm.generate(texts, GREEDY, use_tqdm=False)
    assert len(chats) == len(CONVERSATIONS)
    for chat, gen, conversation in zip(chats, gens, CONVERSATIONS):
        assert chat.prompt_token_ids == gen.prompt_token_ids == _templated(llm, conversation)
        assert chat.outputs[0].token_ids == gen.outputs[0].token_ids
        assert chat.outputs[0].text == gen.outputs[0].text
        assert chat.outputs[0].finish_reason == gen.outputs[0].finish_reason
        assert chat.finished and chat.outputs[0].token_ids
    # Each conversation gets its own reply: batching did not mix them up.
    assert len({tuple(c.prompt_token_ids) for c in chats}) == len(CONVERSATIONS)


def test_chat_single_conversation_and_per_conversation_params(llm):
    one = llm.chat(CONVERSATIONS[0], GREEDY, use_tqdm=False)
    assert len(one) == 1
    assert one[0].prompt_token_ids == _templated(llm, CONVERSATIONS[0])
    params = [SamplingParams(temperature=0.0, max_tokens=2),
              SamplingParams(temperature=0.0, max_tokens=4)]
    two = llm.chat(CONVERSATIONS[:2], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in two] == [2, 4]
    assert two[0].outputs[0].token_ids == one[0].outputs[0].token_ids[:2]


def test_chat_without_generation_prompt(llm):
    out = llm.chat(CONVERSATIONS[0], SamplingParams(temperature=0.0, max_tokens=1),
                   use_tqdm=False, add_generation_prompt=False)[0]
    ids = _templated(llm, CONVERSATIONS[0], add_generation_prompt=False)
    assert out.prompt_token_ids == ids
    assert ids != _templated(llm, CONVERSATIONS[0])
