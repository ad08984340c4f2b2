"""SamplingParams through the whole engine: stop rules, seeds, n > 1, UTF-8 text, validation.

One small LLM for the module; every generation is a few tokens, batched where possible.
"""

from __future__ import annotations

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.core.request import Request
from pagedllm.sampling_params import RequestOutputKind

FRANCE = "The capital of France is"
STORY = "Once upon a time, in a land far away, there lived a dragon who"
REF_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=REF_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_bytes=256 * 2**20, max_model_len=1024)


@pytest.fixture(scope="module")
def tok(llm):
    return llm.get_tokenizer()


@pytest.fixture(scope="module")
def reference(llm) -> dict[str, list[int]]:
    """Greedy token ids of two prompts, the baseline the stop rules cut."""
    outs = llm.generate([FRANCE, STORY], GREEDY, use_tqdm=False)
    for out in outs:
        assert len(out.outputs[0].token_ids) == REF_TOKENS
        assert out.outputs[0].finish_reason == "length" and out.outputs[0].stop_reason is None
    return {FRANCE: outs[0].outputs[0].token_ids, STORY: outs[1].outputs[0].token_ids}


def _assert_pool_whole(llm: LLM) -> None:
    kv = llm.engine.core.kv_cache
    assert kv.num_free_blocks == kv.pool.num_blocks, "KV blocks leaked"
    assert not llm.engine.has_unfinished_requests()


# -- stop strings, stop tokens, EOS, lengths ----------------------------------------------------


def _cross_token_stop(tok, ids: list[int], first: int = 2) -> tuple[str, int, int]:
    """A stop string made of the last 2 characters of token i >= ``first`` and the first 2 of
    token i + 1, whose first occurrence in the text is exactly there. Returns
    (stop, i, its index in the text)."""
    full = tok.decode(ids)
    for i in range(first, len(ids) - 1):
        end = len(tok.decode(ids[:i + 1]))  # the boundary between token i and i + 1
        stop = full[end - 2:end + 2]
        if len(stop) == 4 and stop.strip() == stop and full.find(stop) == end - 2:
            return stop, i, end - 2
    raise AssertionError(f"no stop string across a token boundary in {full!r}")


def test_stop_string_across_token_boundary(llm, tok, reference):
    ids = reference[STORY]
    full = tok.decode(ids)
    stop, i, index = _cross_token_stop(tok, ids)
    assert i + 2 < len(ids)
    plain = SamplingParams(temperature=0.0, max_tokens=REF_TOKENS, stop=[stop, "zzzz"])
    keep = SamplingParams(temperature=0.0, max_tokens=REF_TOKENS, stop=stop,
                          include_stop_str_in_output=True)
    out_plain, out_keep = (o.outputs[0] for o in llm.generate([STORY, STORY], [plain, keep],
                                                              use_tqdm=False))
    for out in (out_plain, out_keep):
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.token_ids == ids[:i + 2]  # token i + 1 completed the stop string
    assert out_plain.text == full[:index]
    assert out_keep.text == full[:index + len(stop)]
    _assert_pool_whole(llm)


def test_stop_string_completed_by_the_last_allowed_token(llm, tok, reference):
    ids = reference[STORY]
    full = tok.decode(ids)
    end = len(tok.decode(ids[:-1]))
    stop = full[end - 2:end + 1]  # ends inside the last token
    assert full.find(stop) == end - 2
    out = llm.generate(STORY, SamplingParams(temperature=0.0, max_tokens=len(ids), stop=stop),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids and out.text == full[:end - 2]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_earliest_stop_string_wins(llm, tok, reference):
    ids = reference[FRANCE]
    full = tok.decode(ids)
    words = full.split()
    early, late = words[0], words[2]
    assert full.index(early) < full.index(late)
    out = llm.generate(FRANCE, SamplingParams(temperature=0.0, max_tokens=REF_TOKENS,
                                              stop=[late, early]), use_tqdm=False)[0].outputs[0]
    assert out.stop_reason == early and out.text == full[:full.index(early)]


def _first_new_token(ids: list[int], start: int) -> int:
    return next(j for j in range(start, len(ids)) if ids[j] not in ids[:j])


def test_stop_token_ids(llm, tok, reference):
    ids = reference[FRANCE]
    j = _first_new_token(ids, 2)
    out = llm.generate(FRANCE, SamplingParams(temperature=0.0, max_tokens=REF_TOKENS,
                                              stop_token_ids=[ids[j]]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids[:j + 1]  # the stop token is in the ids
    assert out.finish_reason == "stop" and out.stop_reason == ids[j]
    assert out.text.startswith(tok.decode(ids[:j]))


def test_stop_token_text_is_left_out(llm, tok, reference):
    ids = reference[FRANCE]
    j = _first_new_token(ids, 2)
    base = dict(temperature=0.0, max_tokens=REF_TOKENS, stop_token_ids=[ids[j]])
    plain, keep = llm.generate([FRANCE, FRANCE], [
        SamplingParams(**base), SamplingParams(**base, include_stop_str_in_output=True)],
        use_tqdm=False)
    assert keep.outputs[0].text == tok.decode(ids[:j + 1])
    assert plain.outputs[0].text == tok.decode(ids[:j])


def test_eos_ignore_eos_min_tokens_and_logit_bias(llm, tok, reference):
    """A logit bias of +100 on EOS makes it the greedy choice at every step; then EOS stops
    the request at once, ignore_eos runs to max_tokens, and min_tokens bans it until then."""
    eos = tok.eos_token_id
    forced = reference[FRANCE][0]  # a plain token, forced the same way
    base = dict(temperature=0.0, max_tokens=5)
    params = [
        SamplingParams(**base, logit_bias={eos: 100.0}),
        SamplingParams(**base, logit_bias={eos: 100.0}, ignore_eos=True),
        SamplingParams(**base, logit_bias={eos: 100.0}, min_tokens=3),
        SamplingParams(**base, logit_bias={forced: 100.0}, stop_token_ids=[forced],
                       min_tokens=2),
        SamplingParams(**base, logit_bias={forced: 100.0}),
    ]
    outs = [o.outputs[0] for o in llm.generate([FRANCE] * len(params), params, use_tqdm=False)]
    stop_now, ignored, delayed, delayed_stop_id, biased = outs
    assert stop_now.token_ids == [eos] and stop_now.finish_reason == "stop"
    assert stop_now.stop_reason is None and stop_now.text == ""
    assert ignored.token_ids == [eos] * 5 and ignored.finish_reason == "length"
    assert len(delayed.token_ids) == 4 and delayed.token_ids[3] == eos
    assert eos not in delayed.token_ids[:3] and delayed.finish_reason == "stop"
    assert len(delayed_stop_id.token_ids) == 3 and delayed_stop_id.token_ids[2] == forced
    assert forced not in delayed_stop_id.token_ids[:2]
    assert delayed_stop_id.finish_reason == "stop" and delayed_stop_id.stop_reason == forced
    assert biased.token_ids == [forced] * 5 and biased.finish_reason == "length"
    _assert_pool_whole(llm)


def test_max_tokens_gives_length(llm, reference):
    out = llm.generate(STORY, SamplingParams(temperature=0.0, max_tokens=3),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == reference[STORY][:3] and out.finish_reason == "length"


def test_min_tokens_defers_stop_strings(llm, tok, reference):
    ids = reference[STORY]
    full = tok.decode(ids)
    stop, i, index = _cross_token_stop(tok, ids)
    # Completed by token i + 1 (the (i + 2)-th), before min_tokens: it must not stop there.
    out = llm.generate(STORY, SamplingParams(temperature=0.0, max_tokens=REF_TOKENS, stop=stop,
                                             min_tokens=i + 3), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ids and out.finish_reason == "length" and out.text == full


# -- the runner's per-row tensors ---------------------------------------------------------------


def test_runner_builds_sampling_tensors_from_params(llm):
    runner, vocab = llm.engine.core.runner, llm.engine.vocab_size

    def request(rid: str, prompt: list[int], output: list[int], **kw) -> Request:
        params = SamplingParams(**kw)
        params.all_stop_token_ids = {2}
        return Request(rid, prompt, params, output_token_ids=list(output))

    reqs = [
        request("t-a", [5, 6, 6], [7, 7, 8], temperature=0.0, repetition_penalty=1.5),
        request("t-b", [9], [], temperature=0.7, top_k=-1, top_p=0.5, seed=11, min_tokens=2,
                stop_token_ids=[13], frequency_penalty=0.5, logit_bias={4: 2.5}),
        request("t-c", [9], [1], temperature=1.0, top_k=3, min_p=0.1, min_tokens=2,
                ignore_eos=True, stop_token_ids=[13], presence_penalty=-1.0),
    ]
    t = runner._sampling_tensors(reqs, vocab)
    try:
        assert t.temperature.tolist() == pytest.approx([0.0, 0.7, 1.0])
        assert t.top_k.tolist() == [0, 0, 3] and t.top_p.tolist() == [1.0, 0.5, 1.0]
        assert not t.all_greedy and t.use_top_k and t.use_top_p and t.use_min_p
        assert t.output_counts[0, 7] == 2 and t.output_counts[0, 8] == 1
        assert t.output_counts[2, 1] == 1 and t.output_counts.sum() == 4
        assert t.prompt_mask[0].nonzero().flatten().tolist() == [5, 6]
        assert t.logit_bias[1, 4] == 2.5 and t.logit_bias.abs().sum() == 2.5
        # min_tokens: b is short of it and bans EOS and its stop id, c only its stop id
        # (ignore_eos); a has no min_tokens.
        assert t.banned[0].sum() == 0
        assert t.banned[1].nonzero().flatten().tolist() == [2, 13]
        assert t.banned[2].nonzero().flatten().tolist() == [13]
        assert t.generators[0] is None and t.generators[2] is None
        want = torch.empty(5).exponential_(generator=torch.Generator().manual_seed(11))
        assert torch.equal(torch.empty(5).exponential_(generator=t.generators[1]), want)
    finally:
        for r in reqs:
            runner.free_request(r.request_id)


# -- seeds and n > 1 ----------------------------------------------------------------------------


def _texts(out) -> list[str]:
    return [c.text for c in out.outputs]


def test_seeded_sampling_reproducible_and_independent_of_batch(llm, reference):
    par = SamplingParams(n=4, temperature=1.0, seed=1234, max_tokens=4)
    one = SamplingParams(temperature=1.0, seed=77, max_tokens=4)
    unseeded = SamplingParams(temperature=1.0, max_tokens=4)
    greedy_seeded = SamplingParams(temperature=0.0, seed=5, max_tokens=4)
    alone = llm.generate([STORY, FRANCE], [par, one], use_tqdm=False)
    samples = _texts(alone[0])
    assert [c.index for c in alone[0].outputs] == [0, 1, 2, 3]
    assert len(set(samples)) == 4, f"temperature 1 samples should differ: {samples}"
    assert all(len(c.token_ids) == 4 for c in alone[0].outputs)
    mixed = llm.generate([FRANCE, STORY, STORY, FRANCE, STORY],
                         [unseeded, par, unseeded, one, greedy_seeded], use_tqdm=False)
    assert _texts(mixed[1]) == samples
    assert _texts(mixed[3]) == _texts(alone[1])
    assert mixed[4].outputs[0].token_ids == reference[STORY][:4]  # seed is moot when greedy
    again = llm.generate(STORY, par, use_tqdm=False)[0]
    assert _texts(again) == samples
    _assert_pool_whole(llm)


# -- text --------------------------------------------------------------------------------------

UTF8_PROMPTS = ["I love pizza 🍕🍕🍕! I love sushi 🍣🍣🍣! I love cake",
                "你好，世界。你好，世界。你好，"]


def test_utf8_round_trip_streamed_and_final(llm, tok):
    """Emoji and CJK characters span several byte-level tokens: no delta may show a half
    character, and the text is exactly the decode of the token ids."""
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=6, output_kind=RequestOutputKind.DELTA)
    deltas: dict[str, list[str]] = {}
    finals = {}
    for i, prompt in enumerate(UTF8_PROMPTS):
        engine.add_request(f"utf8-{i}", prompt, params)
        deltas[f"utf8-{i}"] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            deltas[out.request_id].append(out.outputs[0].text)
            finals.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    split_chars = 0
    for rid, chunks in deltas.items():
        ids = finals[rid]
        text = "".join(chunks)
        assert len(ids) == 6
        assert text == tok.decode(ids)
        assert any(ord(ch) > 0x2000 for ch in text), f"no emoji or CJK in {text!r}"
        assert "\ufffd" not in "".join(chunks[:-1]), chunks
        assert "\ufffd" not in text or "\ufffd" in tok.decode(ids)
        split_chars += sum("\ufffd" in tok.decode([t]) for t in ids)
    assert split_chars > 0, "no character was split across tokens; the test proves nothing"
    _assert_pool_whole(llm)


def _generate_all(engine, prompts: list[str], params: SamplingParams) -> dict:
    """(request id, sample index) -> (text, token ids, finish reason), deltas joined."""
    got: dict = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"kind-{i}", prompt, params)
    while engine.has_unfinished_requests():
        for out in engine.step():
            for c in out.outputs:
                text, ids, _ = got.get((out.request_id, c.index), ("", [], None))
                got[(out.request_id, c.index)] = (text + c.text, ids + c.token_ids,
                                                  c.finish_reason)
    return got


@pytest.mark.parametrize("kwargs", [dict(temperature=0.0, max_tokens=6),
                                    dict(n=2, temperature=1.0, seed=5, max_tokens=8),
                                    "stop token"])
def test_final_only_text_made_at_the_end_equals_the_streamed_text(llm, reference, kwargs):
    """FINAL_ONLY requests without stop strings or logprobs are detokenized only when they
    finish (the engine skips their tokens in between): same text as token by token."""
    if kwargs == "stop token":
        ids = reference[FRANCE]
        kwargs = dict(temperature=0.0, max_tokens=REF_TOKENS,
                      stop_token_ids=[ids[_first_new_token(ids, 3)]])
    prompts = [*UTF8_PROMPTS, FRANCE]
    engine = llm.engine
    final = SamplingParams(**kwargs, output_kind=RequestOutputKind.FINAL_ONLY)
    deferred = _generate_all(engine, prompts, final)
    assert not engine.frontend.output_processor.states  # forgotten when they finished
    streamed = _generate_all(engine, prompts, SamplingParams(
        **kwargs, output_kind=RequestOutputKind.DELTA))
    assert deferred == streamed
    assert len(deferred) == len(prompts) * final.n
    if final.stop_token_ids:
        assert deferred[("kind-2", 0)][2] == "stop"
    _assert_pool_whole(llm)


# -- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "kwargs"), [
    ("temperature", dict(temperature=-0.1)),
    ("top_p", dict(top_p=0.0)),
    ("top_p", dict(top_p=1.5)),
    ("top_k", dict(top_k=-2)),
    ("min_p", dict(min_p=1.5)),
    ("n", dict(n=0)),
    ("presence_penalty", dict(presence_penalty=2.5)),
    ("frequency_penalty", dict(frequency_penalty=-3.0)),
    ("repetition_penalty", dict(repetition_penalty=0.0)),
    ("max_tokens", dict(max_tokens=0)),
    ("min_tokens", dict(min_tokens=-1)),
    ("min_tokens", dict(min_tokens=5, max_tokens=2)),
    ("logprobs", dict(logprobs=-1)),
    ("prompt_logprobs", dict(prompt_logprobs=-1)),
    ("stop", dict(stop=["ok", ""])),
    ("stop_token_ids", dict(stop_token_ids=[-1])),
])
def test_invalid_sampling_params_name_the_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        SamplingParams(**kwargs)


def test_valid_edge_values_are_accepted():
    SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, min_p=0.0, n=1, logprobs=0)
    assert SamplingParams(top_k=-1).top_k == 0
    assert SamplingParams(stop="x").stop == ["x"]


@pytest.mark.parametrize(("field", "kwargs"), [
    ("logprobs", dict(logprobs=21)),
    ("prompt_logprobs", dict(prompt_logprobs=21)),
    ("logit_bias", dict(logit_bias={10**7: 1.0})),
])
def test_engine_limits_are_checked_at_generate(llm, field, kwargs):
    good = SamplingParams(max_tokens=1)
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        llm.generate([FRANCE, FRANCE], [good, SamplingParams(max_tokens=1, **kwargs)],
                     use_tqdm=False)
    _assert_pool_whole(llm)  # the good request queued before it was taken back
    assert llm.engine.config.model.max_logprobs == 20


def test_a_failing_sample_ends_alone_offline(llm, tok) -> None:
    """Offline, a request that fails inside the core comes back with finish reason "error"; the
    other requests of its steps, and the other sample of its own n = 2 request, finish whole."""
    story_ids = tok.encode(STORY)
    runner = llm.engine.core.runner

    def launch(sched, token_masks=None):  # noqa: ANN001, ANN202 - ModelRunner.launch's
        known = {**runner.requests, **{d.request_id: d for d in sched.new_requests}}
        if any(known[s.request_id].prompt_token_ids == story_ids and s.request_id.endswith("-1")
               for s in sched.scheduled):
            raise RuntimeError("injected failure")
        return type(runner).launch(runner, sched, token_masks)

    runner.launch = launch
    try:
        france, story = llm.generate(
            [FRANCE, STORY],
            [GREEDY, SamplingParams(n=2, temperature=0.8, seed=1, max_tokens=REF_TOKENS,
                                    ignore_eos=True)], use_tqdm=False)
    finally:
        del runner.launch
    assert france.outputs[0].finish_reason == "length"
    assert len(france.outputs[0].token_ids) == REF_TOKENS
    first, second = story.outputs
    assert first.finish_reason == "length" and len(first.token_ids) == REF_TOKENS
    assert second.finish_reason == "error"
    _assert_pool_whole(llm)
    assert not llm.engine.core.scheduler.requests  # nothing left behind
