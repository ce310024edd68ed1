"""best_of_n, resample, step_search: a shared prompt cache, known answers with fixed heads."""

import math

import pytest
import torch
from transformers import set_seed

from tokenq.generation import generate
from tokenq.modeling import TokenQConfig, TokenQModel
from tokenq.search import CandidateSearch, pick_candidates
from tests.conftest import tiny_gpt2
from tests.conftest import fixed_advantage_model
from tests.test_generation import left_padded


def _model(tokenizer, seed=3):
    return fixed_advantage_model(tokenizer, torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(seed)))


def test_best_of_n_returns_the_max_score_candidate(tokenizer):
    model = _model(tokenizer)
    enc = left_padded(tokenizer, ["abc", "x"])
    set_seed(0)
    out = generate(model, **enc, strategy="best_of_n", num_candidates=6, beta=0.0, top_k=8, max_new_tokens=5, pad_token_id=0)
    best = out.candidate_scores.argmax(1)
    assert torch.equal(out.scores, out.candidate_scores.max(1).values)
    for b in range(2):
        assert torch.equal(out.sequences[b, 3:], out.candidates[b, best[b], : out.sequences.shape[1] - 3])
    assert out.kl.tolist() == pytest.approx([math.log(6) - 5 / 6] * 2)  # plain candidates: selection term only


def test_best_of_n_with_a_reward_function(tokenizer):
    model = _model(tokenizer)
    enc = left_padded(tokenizer, ["ab"])
    seen = []

    def reward_fn(prompts, completions):
        seen.extend(completions)
        return [c.count("e") - 0.01 * len(c) for c in completions]

    set_seed(1)
    out = generate(model, **enc, strategy="best_of_n", num_candidates=8, beta=0.0, max_new_tokens=6, pad_token_id=0,
                   reward_fn=reward_fn, tokenizer=tokenizer)
    best = max(seen, key=lambda c: c.count("e") - 0.01 * len(c))
    assert tokenizer.decode(out.sequences[0, 2:], skip_special_tokens=True) == best


def test_resampling_frequencies_match_the_softmax():
    scores = torch.tensor([[0.0, 1.0, 2.0, -1.0]]).expand(20000, -1)
    torch.manual_seed(0)
    pick, kl = pick_candidates(scores, "resample", temperature=0.5)
    expected = torch.softmax(scores[0] / 0.5, 0)
    freq = torch.bincount(pick, minlength=4).float() / len(pick)
    assert ((freq - expected).abs() <= 4 * (expected * (1 - expected) / len(pick)).sqrt() + 1e-3).all()
    assert kl[0].item() == pytest.approx((expected * (4 * expected).log()).sum().item(), rel=1e-5)


def test_resample_returns_one_of_its_candidates(tokenizer):
    model = _model(tokenizer)
    enc = left_padded(tokenizer, ["abc"])
    set_seed(2)
    out = generate(model, **enc, strategy="resample", num_candidates=4, resample_temperature=0.1, max_new_tokens=4, pad_token_id=0)
    width = out.sequences.shape[1] - 3
    assert any(torch.equal(out.sequences[0, 3:], c[:width]) for c in out.candidates[0])


@pytest.mark.parametrize("strategy, kw", [("best_of_n", dict(num_candidates=3)),
                                          ("step_search", dict(num_continuations=3, step_tokens=2)),
                                          ("step_search", dict(num_continuations=2, step_tokens=3, step_beam=2))])
def test_greedy_candidates_reproduce_hf_greedy(tokenizer, strategy, kw):
    """Identical greedy candidates make every strategy plain greedy decoding: checks the cache expansion,
    row selection and the position ids across idle rows against HF."""
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig()).eval()
    enc = left_padded(tokenizer, ["abc", "x", "hello wor"])
    hf = model.backbone.generate(**enc, do_sample=False, max_new_tokens=9, eos_token_id=[], pad_token_id=0)
    out = generate(model, **enc, strategy=strategy, do_sample=False, beta=0.0, max_new_tokens=9, eos_token_id=[], pad_token_id=0, **kw)
    assert torch.equal(out.sequences, hf)


def test_step_search_keeps_the_best_value_continuation(tokenizer, monkeypatch):
    model = _model(tokenizer, seed=5)
    rounds = []
    keep_best = CandidateSearch.keep_best

    def spy(self, rows, per_prompt, rank=None):
        ranked = (rows.score if rank is None else rank).view(len(self.spent_tokens), -1).clone()
        kept = keep_best(self, rows, per_prompt, rank)
        rounds.append((ranked, kept.score.clone()))
        return kept

    monkeypatch.setattr(CandidateSearch, "keep_best", spy)
    enc = left_padded(tokenizer, ["abc", "x"])
    set_seed(0)
    out = generate(model, **enc, strategy="step_search", num_continuations=4, step_tokens=2, beta=0.0, top_k=10,
                   max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    assert len(rounds) == 4  # three steps of 2 tokens, then the final pick
    for before, kept in rounds:
        assert torch.equal(kept, before.max(1).values)
    # the kept sequence's score is V(prompt) + its summed advantages: 0.5 + sum of advantage[a_t] here
    adv = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(5))
    assert torch.allclose(out.scores, 0.5 + adv[out.sequences[:, 3:]].sum(1), atol=1e-5)


def test_step_search_on_stop_strings(tokenizer):
    semicolon = tokenizer.convert_tokens_to_ids(";")
    advantage = torch.zeros(len(tokenizer))
    advantage[semicolon] = 1.0
    model = fixed_advantage_model(tokenizer, advantage)
    enc = left_padded(tokenizer, ["ab"])
    out = generate(model, **enc, strategy="step_search", step_stop_strings=[";"], tokenizer=tokenizer, num_continuations=3,
                   beta=1e4, max_new_tokens=4, eos_token_id=[], pad_token_id=0)
    # every step is one ';' (the guided choice), so 4 rounds of 3 continuations of 1 token each
    assert tokenizer.decode(out.sequences[0, 2:]) == ";;;;"
    assert out.generated_tokens.tolist() == [12]


def test_stop_strings_and_eos_end_candidates(tokenizer):
    c, eos = tokenizer.convert_tokens_to_ids("c"), tokenizer.eos_token_id
    enc = left_padded(tokenizer, ["ab", "xyz"])
    for token, extra in ((c, dict(stop_strings=["c"], tokenizer=tokenizer)), (eos, {})):
        advantage = torch.zeros(len(tokenizer))
        advantage[token] = 1.0
        model = fixed_advantage_model(tokenizer, advantage)
        for kw in (dict(strategy="best_of_n", num_candidates=3), dict(strategy="resample", num_candidates=2),
                   dict(strategy="step_search", step_tokens=2, num_continuations=2)):
            out = generate(model, **enc, beta=1e4, max_new_tokens=5, pad_token_id=0, eos_token_id=eos, **kw, **extra)
            assert out.sequences.shape[1] == 4 and (out.sequences[:, 3] == token).all()
            assert out.generated_tokens.tolist() == [kw.get("num_candidates", kw.get("num_continuations"))] * 2


def test_compute_accounting_of_candidate_search(tokenizer):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    calls = []
    model.backbone.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True)
    enc = left_padded(tokenizer, ["abc", "x"])
    out = generate(model, **enc, strategy="best_of_n", num_candidates=4, beta=1.0, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    # the prompt runs once (2 rows of 3 tokens), then 5 forwards of 2 x 4 candidate rows with one token each
    assert calls == [torch.Size([2, 3])] + [torch.Size([8, 1])] * 5
    assert out.forward_passes.tolist() == [1 + 5 * 4] * 2
    assert out.generated_tokens.tolist() == [6 * 4] * 2
    calls.clear()
    out = generate(model, **enc, strategy="step_search", num_continuations=3, step_tokens=2, beta=1.0, max_new_tokens=4,
                   eos_token_id=[], pad_token_id=0)
    assert sum(shape[0] for shape in calls) == out.forward_passes.sum().item()
    assert out.generated_tokens.tolist() == [3 * 4] * 2


@pytest.mark.parametrize("strategy, kw", [("best_of_n", dict(num_candidates=2)), ("step_search", dict(num_continuations=2, step_tokens=2, step_beam=2))])
def test_left_padded_batch_equals_prompts_one_by_one(tokenizer, strategy, kw):
    model = _model(tokenizer, seed=6)
    prompts = ["abc", "x", "hello wor"]
    common = dict(strategy=strategy, do_sample=False, beta=2.0, top_k=8, max_new_tokens=7, eos_token_id=[], pad_token_id=0, **kw)
    batch = generate(model, **left_padded(tokenizer, prompts), **common)
    for i, p in enumerate(prompts):
        single = generate(model, **left_padded(tokenizer, [p]), **common)
        assert torch.equal(batch.sequences[i, -7:], single.sequences[0, -7:])
        assert batch.scores[i].item() == pytest.approx(single.scores[0].item(), abs=1e-5)
        assert batch.generated_tokens[i] == single.generated_tokens[0]


def test_search_passes_the_cache_under_this_transformers_versions_name(tokenizer):
    """transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name warns on every call and
    goes in 5.40): the candidate search uses whichever name the backbone's forward takes, without a warning."""
    import inspect
    import warnings

    from tokenq.backbone import cache_argument

    model = _model(tokenizer)
    takes_cache = "cache" in inspect.signature(model.backbone.forward).parameters
    assert cache_argument(model.backbone) == ("cache" if takes_cache else "past_key_values")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        out = generate(model, **left_padded(tokenizer, ["abc", "x"]), strategy="step_search", num_continuations=2,
                       step_tokens=2, beta=1.0, top_k=8, max_new_tokens=4, pad_token_id=0)
    assert out.sequences.shape[0] == 2


def test_rows_that_stop_early_leave_the_batch_and_come_back_in_place(tokenizer, monkeypatch):
    """Steps of different lengths (they end at a stop string): rows at a boundary leave the batch while the others
    decode on, and come back in place. Greedy step search then writes exactly the greedy sequences, with fewer forward
    rows than when the waiting rows stay in the batch."""
    import tokenq.search

    model = _model(tokenizer, seed=4)
    model.backbone.double()  # batches of other sizes round differently: no float32 near-ties in the argmax
    enc = left_padded(tokenizer, ["abc", "x", "hello", "q"])
    plain = generate(model, **enc, strategy="step_search", do_sample=False, num_continuations=1, step_tokens=12, beta=0.0,
                     max_new_tokens=12, eos_token_id=[], pad_token_id=0)  # greedy decoding, every row to the end
    pieces = [[tokenizer.decode([t]) for t in row] for row in plain.sequences[:, enc["input_ids"].shape[1] :].tolist()]
    # a one-character token first written at different steps by the rows' greedy texts: steps of different lengths
    first = {c: [row.index(c) if c in row else len(row) for row in pieces] for row in pieces for c in row if len(c) == 1}
    stop = next(c for c, where in first.items() if len(set(where)) > 1)
    outs = {}
    for fraction in (0.25, 2.0):  # 2.0: waiting rows stay in the batch (fed padding)
        monkeypatch.setattr(tokenq.search, "PARK_FRACTION", fraction)
        outs[fraction] = generate(model, **enc, strategy="step_search", do_sample=False, num_continuations=2,
                                  step_stop_strings=[stop], tokenizer=tokenizer, beta=0.0, max_new_tokens=12,
                                  eos_token_id=[], pad_token_id=0)
    parked, waiting = outs[0.25], outs[2.0]
    assert torch.equal(parked.sequences, plain.sequences)
    assert torch.equal(parked.generated_tokens, waiting.generated_tokens)
    assert (parked.forward_passes <= waiting.forward_passes).all() and parked.forward_passes.sum() < waiting.forward_passes.sum()
