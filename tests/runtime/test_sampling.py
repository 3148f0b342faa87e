import collections

import pytest
import torch

from flashmoe.runtime.sampling import Sampler, SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.9, -1.0, 0.5])


def sampler(**params) -> Sampler:
    return Sampler(SamplingParams(**params), vocab_size=5)


def test_greedy_and_degenerate_filters_pick_the_argmax():
    assert sampler(temperature=0)(LOGITS) == 1
    assert sampler(temperature=1.0, top_k=1, seed=0)(LOGITS) == 1
    assert sampler(temperature=1.0, top_p=1e-6, seed=0)(LOGITS) == 1


def test_a_greedy_draw_takes_the_batch_argmax_and_a_penalized_or_sampled_one_ignores_it():
    """The scheduler reads a batch's argmaxes in one sync and hands each sequence its row's: a
    plain greedy draw returns it; a repetition penalty or a temperature changes the answer, so
    those draw from the logits."""
    assert sampler(temperature=0)(LOGITS, argmax=4) == 4  # taken as given, nothing read back
    penalized = Sampler(SamplingParams(temperature=0, repetition_penalty=10.0), vocab_size=5, seen=[1])
    assert penalized(LOGITS, argmax=1) == 2  # token 1 was seen: the penalty moves the argmax
    assert sampler(temperature=5.0, top_k=2, seed=1)(LOGITS, argmax=4) in {1, 2}


def test_seed_reproduces_and_top_k_restricts():
    a = [sampler(temperature=5.0, seed=7) for _ in range(2)]
    assert [a[0](LOGITS) for _ in range(20)] == [a[1](LOGITS) for _ in range(20)]
    s = sampler(temperature=5.0, top_k=2, seed=1)
    assert {s(LOGITS) for _ in range(200)} == {1, 2}


def test_temperature_alone_draws_each_token_by_its_probability():
    """No top-k and no top-p: drawn from the softmax over the whole vocabulary, unsorted."""
    s = sampler(temperature=2.0, seed=3)
    counts = collections.Counter(s(LOGITS) for _ in range(4000))
    want = torch.softmax(LOGITS / 2.0, dim=0)
    assert all(abs(counts[i] / 4000 - float(want[i])) < 0.03 for i in range(5))


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]).log()
    s = sampler(temperature=1.0, top_p=0.75, seed=0)
    assert {s(probs) for _ in range(300)} == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75


def test_repetition_penalty_follows_the_hf_rule_and_remembers_what_it_drew():
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), vocab_size=5, seen=[1])
    assert s(LOGITS) == 2  # 3.0 / 2 = 1.5 < 2.9
    assert s(LOGITS) == 1  # 2 was drawn, so it is penalized too: 1.5 now beats 2.9 / 2 = 1.45
    neg = torch.tensor([-1.0, -1.2, -5.0, -5.0, -5.0])
    assert Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), vocab_size=5, seen=[0])(neg) == 1


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_k=-1), dict(repetition_penalty=0)])
def test_invalid_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
