"""Guided decoding through HF generate: sample / greedy / beam, with models whose answer is known."""

import pytest
import torch
from packaging.version import Version
from transformers import LogitsProcessor, TopPLogitsWarper, set_seed

from tokenq.generation import generate, guided_sample
from tokenq.guidance import Guide, behaviour_filter, kl_divergence
from tokenq.modeling import TokenQConfig, TokenQModel
from tests.conftest import fixed_advantage_model, tiny_gpt2


def left_padded(tokenizer, prompts):
    tokenizer.padding_side = "left"
    return tokenizer(prompts, return_tensors="pt", padding=True)


def teacher_forced_logits(model, sequences, prompt_mask):
    """Backbone logits at every position of left-padded `sequences` (B, T, V)."""
    mask = torch.cat([prompt_mask, torch.ones_like(sequences[:, prompt_mask.shape[1]:])], 1)
    with torch.no_grad():
        logits = model.backbone(sequences, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0)).logits
    return logits


KW = lambda tok: dict(max_new_tokens=10, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)  # noqa: E731


@pytest.mark.parametrize("filters", [dict(top_k=5), dict(top_p=0.8, temperature=0.7), dict(top_k=7, top_p=0.9, temperature=1.3), dict()])
def test_beta_zero_is_hf_sampling_token_for_token(tokenizer, filters):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    enc = left_padded(tokenizer, ["abc", "x", "hello wor"])
    set_seed(123)
    hf = model.backbone.generate(**enc, do_sample=True, top_k=filters.get("top_k", 0), top_p=filters.get("top_p", 1.0),
                                 temperature=filters.get("temperature", 1.0), **KW(tokenizer))
    set_seed(123)
    ours = guided_sample(model, enc.input_ids, enc.attention_mask, beta=0.0, **filters, **KW(tokenizer))
    assert torch.equal(hf, ours)


def test_beta_zero_is_hf_greedy_and_beam_search(tokenizer):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    enc = left_padded(tokenizer, ["abc", "x", "hello wor"])
    greedy = model.backbone.generate(**enc, do_sample=False, **KW(tokenizer))
    assert torch.equal(generate(model, **enc, strategy="greedy", beta=0.0, **KW(tokenizer)).sequences, greedy)
    beams = model.backbone.generate(**enc, do_sample=False, num_beams=4, **KW(tokenizer))
    assert torch.equal(generate(model, **enc, num_beams=4, beta=0.0, **KW(tokenizer)).sequences, beams)


class GuidedBeamReference(LogitsProcessor):
    """HF-side reference for guided beam search, with HF's own top-p warper: log pi_beta (renormalised at
    `temperature`), its top-k, top-p among those, then + beta * advantage[a]."""

    def __init__(self, advantage: torch.Tensor, beta: float, k: int, temperature: float | None = None, top_p: float | None = None):
        self.advantage, self.beta, self.k, self.temperature, self.top_p = advantage, beta, k, temperature, top_p

    def __call__(self, input_ids, scores):
        if self.temperature:
            scores = torch.log_softmax(scores / self.temperature, dim=-1)
        values, index = scores.topk(self.k, dim=-1)
        masked = torch.full_like(scores, float("-inf")).scatter_(-1, index, values)
        if self.top_p:
            masked = TopPLogitsWarper(self.top_p)(input_ids, masked)
        return masked + self.beta * self.advantage


@pytest.mark.parametrize("extra", [dict(), dict(length_penalty=0.3, num_return_sequences=2), dict(repetition_penalty=1.5),
                                   dict(temperature=0.5, top_p=0.7)])
def test_guided_beam_search_is_hf_beam_search_on_the_guided_scores(tokenizer, extra):
    """tokenq ranks each beam's candidates itself; HF beam search over the whole vocabulary with the guided
    scores as a logits processor must choose the same sequences (HF's own processors, such as the
    repetition penalty, run first in both)."""
    advantage = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(5)) * 3
    model = fixed_advantage_model(tokenizer, advantage)
    enc = left_padded(tokenizer, ["abc", "x", "hello wor"])
    filters = {k: extra.pop(k) for k in ("temperature", "top_p") if k in extra}
    guidance = GuidedBeamReference(advantage, 2.0, 6, **filters)
    reference = model.backbone.generate(**enc, do_sample=False, num_beams=3, logits_processor=[guidance], **extra, **KW(tokenizer))
    out = generate(model, **enc, num_beams=3, beta=2.0, top_k=6, **filters, **extra, **KW(tokenizer))
    assert torch.equal(out.sequences, reference)
    assert len(out.scores) == len(reference)
    with pytest.raises(ValueError, match="beam sampling"):
        generate(model, **enc, num_beams=3, do_sample=True, **KW(tokenizer))


def test_guide_adds_beta_advantage_on_the_filtered_support_only(tokenizer):
    advantage = torch.linspace(-1.0, 1.0, len(tokenizer))
    model = fixed_advantage_model(tokenizer, advantage)
    ids = tokenizer(["abc"], return_tensors="pt").input_ids
    with model.reading_features() as tap:
        logits = model.backbone(ids).logits[:, -1]
    h = tap.pop()[:, -1]
    filtered = behaviour_filter(temperature=0.8, top_k=6)(ids, logits.clone())
    guided, kl, index, q, v = Guide(model, 3.0, "sample", temperature=0.8, top_k=6).step(ids, logits.clone(), h)
    assert torch.allclose(q, advantage[index] + 0.5, atol=1e-6)  # Q on the 6 candidates only
    finite = torch.isfinite(filtered)
    assert finite.sum() == 6 and torch.equal(torch.isfinite(guided), finite)
    assert torch.allclose(guided[finite], filtered[finite] + 3.0 * advantage[finite[0]], atol=1e-5)
    p, q = torch.softmax(guided, -1)[finite], torch.softmax(filtered, -1)[finite]
    assert kl.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)


def test_guided_sampling_frequencies_match_the_known_policy(tokenizer):
    vocab = len(tokenizer)
    advantage = torch.rand(vocab, generator=torch.Generator().manual_seed(0))
    model = fixed_advantage_model(tokenizer, advantage)
    ids = tokenizer(["ab"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.backbone(ids).logits[0, -1]
    top = logits.topk(5)
    expected = torch.zeros(vocab)
    expected[top.indices] = torch.softmax(top.values + 2.0 * advantage[top.indices], dim=0)
    n = 4000
    set_seed(0)
    out = guided_sample(model, ids.expand(n, -1), None, beta=2.0, top_k=5, max_new_tokens=1, pad_token_id=0)
    freq = torch.bincount(out[:, -1], minlength=vocab).float() / n
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((freq - expected).abs() <= 4 * sigma + 1e-3).all()
    assert freq[expected == 0].sum() == 0


def test_guided_greedy_is_argmax_of_log_pi_beta_plus_beta_advantage_in_the_support(tokenizer):
    advantage = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(1))
    model = fixed_advantage_model(tokenizer, advantage)
    enc = left_padded(tokenizer, ["abc", "x"])
    out = generate(model, **enc, strategy="greedy", beta=1.5, temperature=0.7, top_k=4, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    logits = teacher_forced_logits(model, out.sequences, enc.attention_mask)
    prompt_len = enc.input_ids.shape[1]
    for t in range(6):
        step = logits[:, prompt_len + t - 1] / 0.7
        top = step.topk(4)
        log_pi = torch.log_softmax(top.values, -1)
        expected = top.indices.gather(1, (log_pi + 1.5 * advantage[top.indices]).argmax(1, keepdim=True)).squeeze(1)
        assert torch.equal(out.sequences[:, prompt_len + t], expected)


def test_large_beta_never_leaves_pi_beta_support(tokenizer):
    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=7), TokenQConfig())
    ids = tokenizer(["ab"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model.backbone(ids).logits[0, -1]
    support = logits.topk(3).indices
    advantage = torch.zeros(len(tokenizer))
    advantage[logits.argmin()] = 5.0  # the best advantage lies outside pi_beta's top-3: never chosen
    advantage[support[2]] = 1.0
    model = fixed_advantage_model(tokenizer, advantage)
    set_seed(0)
    out = guided_sample(model, ids.expand(64, -1), None, beta=1e4, top_k=3, max_new_tokens=1, pad_token_id=0)
    assert (out[:, -1] == support[2]).all()


def test_kl_and_scores_of_guided_sampling_are_exact(tokenizer):
    advantage = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(2))
    model = fixed_advantage_model(tokenizer, advantage)
    enc = left_padded(tokenizer, ["abc", "x"])
    set_seed(0)
    out = generate(model, **enc, beta=2.0, top_k=6, **KW(tokenizer))
    logits = teacher_forced_logits(model, out.sequences, enc.attention_mask)
    prompt_len = enc.input_ids.shape[1]
    for b in range(2):
        n = int(out.generated_tokens[b])
        kl = 0.0
        for t in range(n):
            filtered = behaviour_filter(top_k=6)(None, logits[b : b + 1, prompt_len + t - 1].clone())
            kl += kl_divergence(filtered + 2.0 * advantage, filtered).item()
        assert out.kl[b].item() == pytest.approx(kl, rel=1e-4, abs=1e-6)
        # value score = V(prompt) + summed advantages of the generated tokens = 0.5 + sum of advantage[a_t]
        expected = 0.5 + advantage[out.sequences[b, prompt_len : prompt_len + n]].sum().item()
        assert out.scores[b].item() == pytest.approx(expected, abs=1e-5)


def test_left_padded_batch_equals_prompts_one_by_one(tokenizer):
    model = fixed_advantage_model(tokenizer, torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(3)))
    prompts = ["abc", "x", "hello wor"]
    for kw in (dict(strategy="greedy"), dict(num_beams=3)):
        batch = generate(model, **left_padded(tokenizer, prompts), beta=1.0, **kw, **KW(tokenizer))
        width = batch.sequences.shape[1] - left_padded(tokenizer, prompts).input_ids.shape[1]
        for i, p in enumerate(prompts):
            single = generate(model, **left_padded(tokenizer, [p]), beta=1.0, **kw, **KW(tokenizer))
            new = single.sequences[0, len(p):]
            assert torch.equal(batch.sequences[i, -width:][: len(new)], new)
            assert batch.scores[i].item() == pytest.approx(single.scores[0].item(), abs=1e-5)


def test_stop_strings_and_eos_end_sequences(tokenizer):
    c, eos = tokenizer.convert_tokens_to_ids("c"), tokenizer.eos_token_id
    enc = left_padded(tokenizer, ["ab", "xyz"])
    for token, extra in ((c, dict(stop_strings=["c"], tokenizer=tokenizer)), (eos, {})):
        advantage = torch.zeros(len(tokenizer))
        advantage[token] = 1.0
        model = fixed_advantage_model(tokenizer, advantage)
        for kw in (dict(strategy="sample"), dict(strategy="greedy"), dict(num_beams=2)):
            out = generate(model, **enc, beta=1e4, max_new_tokens=5, pad_token_id=0, eos_token_id=eos, top_k=len(tokenizer), **kw, **extra)
            # beam search counts every running beam's token at every step it ran: its first hypothesis ends at
            # step 1, the two beams still running end at step 2 and fill the hypotheses (HF's stopping rule)
            assert out.generated_tokens.tolist() == [4 if "num_beams" in kw else 1] * 2
            assert out.sequences.shape[1] == 4
            assert (out.sequences[:, 3] == token).all() and (out.sequences[:, 4:] == 0).all()


def test_compute_accounting_counts_every_backbone_row(tokenizer):
    model = TokenQModel(tiny_gpt2(len(tokenizer)), TokenQConfig())
    rows = []
    model.backbone.register_forward_pre_hook(lambda m, args, kwargs: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    enc = left_padded(tokenizer, ["abc", "x"])
    for kw in (dict(strategy="sample"), dict(strategy="greedy"), dict(num_beams=3)):
        rows.clear()
        out = generate(model, **enc, beta=1.0, max_new_tokens=7, eos_token_id=[], pad_token_id=0, **kw)
        assert out.forward_passes.sum().item() == sum(rows)
        assert out.generated_tokens.tolist() == [7 * kw.get("num_beams", 1)] * 2


@pytest.mark.parametrize("filters", [dict(top_k=20, top_p=0.9), dict(top_k=7, temperature=0.6), dict(top_k=30, top_p=0.5, temperature=1.4), dict(top_p=0.8)])
def test_fast_candidate_filter_equals_hf_warpers(gpt2, filters):
    """Guided decoding filters on the top-k candidates only; the surviving set and scores are HF's."""
    model = TokenQModel(gpt2, TokenQConfig())
    logits = torch.randn(64, 500, generator=torch.Generator().manual_seed(0)) * 3
    guide = Guide(model, 1.0, "sample", **filters)
    filtered, values, index = guide._filter_with_candidates(None, logits.clone())
    reference = behaviour_filter(**filters)(None, logits.clone())
    assert torch.equal(torch.isfinite(filtered), torch.isfinite(reference))
    assert torch.allclose(filtered[torch.isfinite(filtered)], reference[torch.isfinite(reference)])
    assert torch.equal(values, filtered.gather(-1, index))


def test_streamer_and_stopping_criteria_pass_through_to_hf(tokenizer):
    from transformers import StoppingCriteria, StoppingCriteriaList
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.flatten().tolist())

        def end(self):
            self.ended = True

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 3 + 3, dtype=torch.bool)

    model = fixed_advantage_model(tokenizer, torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(4)))
    enc = left_padded(tokenizer, ["abc"])
    streamer = Collect()
    set_seed(0)
    out = generate(model, **enc, beta=2.0, top_k=5, streamer=streamer, stopping_criteria=StoppingCriteriaList([AfterThree()]),
                   max_new_tokens=10, eos_token_id=[], pad_token_id=0)
    assert out.sequences.shape[1] == 6 and out.generated_tokens.tolist() == [3]
    assert streamer.ended and sum(streamer.chunks[1:], []) == out.sequences[0, 3:].tolist()
    with pytest.raises(ValueError, match="only apply to strategies sample"):
        generate(model, **enc, strategy="best_of_n", streamer=streamer)
    with pytest.raises(ValueError, match="cannot be used with beam search"):
        generate(model, **enc, num_beams=2, streamer=streamer)


@pytest.mark.parametrize("kw", [dict(strategy="greedy"), dict(num_beams=3)])
def test_value_scores_of_greedy_and_beam_outputs(tokenizer, kw, beam_path):
    advantage = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(8))
    model = fixed_advantage_model(tokenizer, advantage)
    enc = left_padded(tokenizer, ["abc", "x"])
    out = generate(model, **enc, beta=1.0, top_k=6, **kw, **KW(tokenizer))
    for b in range(2):
        n = int((out.sequences[b, 3:] != 0).sum())  # no EOS in this model's top-6: all tokens are generated
        expected = 0.5 + advantage[out.sequences[b, 3 : 3 + n]].sum().item()
        assert out.scores[b].item() == pytest.approx(expected, abs=1e-5)


@pytest.fixture(params=["private loop", "public path"])
def beam_path(request, monkeypatch):
    """Guided beam search both ways: tokenq's loop on HF's private beam helpers (the tested transformers versions)
    and HF's public beam search with the guidance as a logits processor (any other version)."""
    import tokenq.generation

    if request.param == "public path":
        monkeypatch.setattr(tokenq.generation, "private_beam_loop_tested", lambda: False)
    elif not tokenq.generation.private_beam_loop_tested():
        pytest.skip("this transformers version is outside the private loop's tested range")
    return request.param


@pytest.mark.parametrize("extra", [dict(), dict(length_penalty=0.3, num_return_sequences=2), dict(repetition_penalty=1.5),
                                   dict(temperature=0.5, top_p=0.7), dict(stop_strings=["c"])])
def test_both_beam_paths_are_hf_beam_search_on_the_guided_scores(tokenizer, extra, beam_path):
    advantage = torch.rand(len(tokenizer), generator=torch.Generator().manual_seed(5)) * 3
    model = fixed_advantage_model(tokenizer, advantage)
    enc = left_padded(tokenizer, ["abc", "x", "hello wor"])
    filters = {k: extra.pop(k) for k in ("temperature", "top_p") if k in extra}
    reference = model.backbone.generate(**enc, do_sample=False, num_beams=3, logits_processor=[GuidedBeamReference(advantage, 2.0, 6, **filters)],
                                        **extra, **KW(tokenizer), tokenizer=tokenizer)
    out = generate(model, **enc, num_beams=3, beta=2.0, top_k=6, **filters, **extra, **KW(tokenizer), tokenizer=tokenizer)
    assert torch.equal(out.sequences, reference) and len(out.scores) == len(reference)


def test_beam_paths_on_a_trained_model_agree(tokenizer, monkeypatch):
    import tokenq.generation

    model = TokenQModel(tiny_gpt2(len(tokenizer), seed=3), TokenQConfig())
    enc = left_padded(tokenizer, ["abc", "x"])
    kw = dict(num_beams=4, beta=3.0, top_k=8, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    if not tokenq.generation.private_beam_loop_tested():
        pytest.skip("this transformers version is outside the private loop's tested range")
    fast = generate(model, **enc, **kw)
    monkeypatch.setattr(tokenq.generation, "private_beam_loop_tested", lambda: False)
    public = generate(model, **enc, **kw)
    assert torch.equal(fast.sequences, public.sequences) and torch.allclose(fast.scores, public.scores, atol=1e-5)
    assert (fast.forward_passes < public.forward_passes).all()  # the loop prefills each prompt once, HF once per beam


def test_private_beam_loop_runs_only_on_tested_transformers_versions():
    import transformers

    from tokenq.beam import TESTED_TRANSFORMERS, private_beam_loop_tested

    low, high = TESTED_TRANSFORMERS
    assert private_beam_loop_tested(f"{low}.0") and private_beam_loop_tested(f"{high}.3")
    assert not private_beam_loop_tested("6.0.0") and not private_beam_loop_tested("5.99.0")
    # A release newer than the tested range fails here, loudly: read transformers' `_beam_search` and the helpers
    # tokenq/beam.py calls, run these tests with the loop forced on, then move TESTED_TRANSFORMERS' upper end.
    installed = Version(transformers.__version__).release[:2]
    assert installed <= Version(high).release[:2], (
        f"transformers {transformers.__version__} is newer than the guided beam loop's tested range {TESTED_TRANSFORMERS}: "
        "guided beam search now takes HF's public beam search (correct, slower); check tokenq/beam.py against this release")
