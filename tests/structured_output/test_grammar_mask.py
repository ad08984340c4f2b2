"""The token mask itself, on a small vocabulary: the tokens a step allows are exactly the tokens
the grammar accepts next; and the sampler applies a mask to its rows only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import AddedToken, models
from tokenizers import Tokenizer as BackendTokenizer

from pagedllm.sampling_params import SamplingParams, StructuredOutputsParams
from pagedllm.structured_output.backend import Grammar, GrammarCompiler, check_grammar
from pagedllm.structured_output.bitmask import allowed_tokens, token_bitmask_row
from pagedllm.structured_output.manager import StructuredOutputManager
from pagedllm.tokenizer import Tokenizer
from pagedllm.worker.sampler import Sampler, SamplingTensors, apply_token_bitmask_

# Byte-level spellings: printable ASCII is itself, "Ġ" is a space.
VOCAB = ["{", "}", '"', ":", ",", "a", "b", "ab", "ba", "1", "2", "12", "[", "]", "Ġ", '"a"',
         '{"', "yes", "no", "y", "n", "es"]
EOS = len(VOCAB)  # <eos>, a special token
VOCAB_SIZE = EOS + 3  # the model's vocabulary may be larger than the tokenizer's


@pytest.fixture(scope="module")
def compiler() -> GrammarCompiler:
    backend = BackendTokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)},
                                                unk_token="a"))
    backend.add_special_tokens([AddedToken("<eos>", special=True)])
    tokenizer = Tokenizer(backend, bos_token_id=None, eos_token_id=EOS)
    return GrammarCompiler(tokenizer, VOCAB_SIZE, [EOS])


def _accepted(compiled, prefix: list[int]) -> set[int]:
    """Brute force: the tokens a fresh matcher, fed ``prefix``, accepts next."""
    out = set()
    for token in range(VOCAB_SIZE):
        g = Grammar(compiled)
        assert all(g.accept(t) for t in prefix)
        if g.accept(token):
            out.add(token)
    return out


def _mask(compiled, prefix: list[int]) -> set[int]:
    manager: StructuredOutputManager[str] = StructuredOutputManager(lambda: None, VOCAB_SIZE)
    manager._masks["r"] = type("M", (), {"grammar": Grammar(compiled), "allowed": None,
                                         "bad_words": []})()
    for t in prefix:
        assert manager.accept("r", t)
    step = manager.step_bitmask([("r", prefix)])
    assert step is not None and step.rows.tolist() == [0]
    return set(np.flatnonzero(allowed_tokens(step.bitmask[0], VOCAB_SIZE)).tolist())


@pytest.mark.parametrize(("spec", "walk"), [
    (StructuredOutputsParams(choice=["yes", "no"]), ["y", "es"]),
    (StructuredOutputsParams(regex="(ab|b)+1"), ["ab", "b", "ab", "1"]),
    (StructuredOutputsParams(grammar='root ::= "[" item ("," item)* "]"\nitem ::= "a" | "12"'),
     ["[", "a", ",", "12", "]"]),
    (StructuredOutputsParams(json={"type": "object", "properties": {"a": {"type": "integer"}},
                                   "required": ["a"]}, disable_any_whitespace=True),
     ['{"', "a", '"', ":", "Ġ", "1", "2", "}"]),
])
def test_mask_allows_exactly_what_the_grammar_accepts(compiler, spec, walk):
    compiled = compiler.compile(spec)
    prefix: list[int] = []
    for piece in [*walk, None]:
        assert _mask(compiled, prefix) == _accepted(compiled, prefix), prefix
        if piece is not None:
            prefix.append(VOCAB.index(piece))
    assert _mask(compiled, prefix) == {EOS}  # complete: only the stop token
    assert not ({EOS} & _mask(compiled, prefix[:1]))  # never mid-way


def test_json_object_and_bad_specs():
    check_grammar(StructuredOutputsParams(json_object=True))
    check_grammar(StructuredOutputsParams(json=json.dumps({"type": "string"})))
    for spec, field in [(StructuredOutputsParams(json={"type": "objec"}), "json"),
                        (StructuredOutputsParams(json="{oops"), "json"),
                        (StructuredOutputsParams(regex="(ab"), "regex"),
                        (StructuredOutputsParams(grammar="root ::= undefined"), "grammar")]:
        with pytest.raises(ValueError, match=f"structured_outputs.{field}"):
            check_grammar(spec)
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])


def test_allowed_token_ids_and_bad_words_in_one_mask():
    params = SamplingParams(allowed_token_ids=[3, 4, 5, 40])
    params.bad_words_token_ids = [[5], [7, 4]]  # 5 always; 4 right after 7
    manager: StructuredOutputManager[str] = StructuredOutputManager(lambda: None, 50)
    assert not manager.add("r", params, "r")  # no grammar: nothing to wait for
    for output, allowed in [([1], {3, 4, 40}), ([1, 7], {3, 40})]:
        step = manager.step_bitmask([("other", []), ("r", output)])
        assert step is not None and step.rows.tolist() == [1]
        assert set(np.flatnonzero(allowed_tokens(step.bitmask[0], 50))) == allowed
    manager.free("r")
    assert manager.step_bitmask([("r", [])]) is None


def test_sampler_masks_only_its_rows():
    vocab = 70
    logits = torch.randn(3, vocab)
    rows = torch.tensor([1])
    bitmask = torch.from_numpy(token_bitmask_row([2, 33, 69], vocab)[None])
    masked = logits.clone()
    apply_token_bitmask_(masked, rows, bitmask)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [2, 33, 69]
    n = 3
    t = SamplingTensors(
        temperature=torch.zeros(n), top_p=torch.ones(n), top_k=torch.zeros(n, dtype=torch.int64),
        min_p=torch.zeros(n), presence_penalty=torch.zeros(n), frequency_penalty=torch.zeros(n),
        repetition_penalty=torch.ones(n), generators=[None] * n, all_greedy=True,
        bitmask_rows=rows, token_bitmask=bitmask, max_num_logprobs=0)
    out = Sampler()(logits, t)
    assert out.token_ids[1].item() == max([2, 33, 69], key=lambda i: logits[1, i].item())
    assert out.token_ids[0].item() == logits[0].argmax().item()
    # logprobs stay those of the raw distribution
    assert torch.allclose(out.logprobs[:, 0], logits.log_softmax(-1).gather(
        -1, out.token_ids[:, None])[:, 0])
