"""QSA's token indexer against transformers': the positions each query sees, for a sequence
longer than the budget, selected at once or as prefill pieces and decode steps would."""

import torch

from flashmoe.layers.indexer import TokenIndexer
from flashmoe.layers.rotary import RotaryEmbedding
from flashmoe.layers.state import IndexedKVCache
from flashmoe.models import args_from_dict

from ..conftest import FAMILY_CONFIGS, randomize


@torch.no_grad()
def test_selection_is_transformers_at_once_and_in_pieces():
    import transformers as tf
    from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextQSAIndexer, Qwen4ExpTextRotaryEmbedding

    text = FAMILY_CONFIGS["qwen4_exp"]["text_config"]
    config = tf.Qwen4ExpTextConfig(**text)
    ref = Qwen4ExpTextQSAIndexer(config, 1)
    randomize(ref, 5)
    args = args_from_dict({**text, "model_type": "qwen4_exp_text"})
    rotary = RotaryEmbedding(*args.rotary())
    ours = TokenIndexer(config.hidden_size, args.attention().indexer, config.rms_norm_eps, True, rotary)
    ours.load_state_dict(ref.state_dict())
    T = 41  # 10 blocks of 4: each query past position 11 sees more blocks than the budget's 2
    x = torch.randn(T, config.hidden_size, generator=torch.Generator().manual_seed(6))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    cos, sin = Qwen4ExpTextRotaryEmbedding(config)(x[None], torch.arange(T)[None])
    expected = ref(x[None], (cos, sin), causal[None, None], None)[0, 0] & causal
    assert (expected.sum(-1) < torch.arange(1, T + 1)).any()  # the selection drops positions
    q, k = ours.project(x, *rotary(torch.arange(T)))
    assert torch.equal(ours.select(q, k, IndexedKVCache(1, 4, 8, torch.float32, "cpu"), 0), expected)
    cache = IndexedKVCache(1, 4, 8, torch.float32, "cpu")
    for a, b in [(0, 3), (3, 10), (10, 11), (11, 12), (12, 30), *[(t, t + 1) for t in range(30, T)]]:
        assert torch.equal(ours.select(q[a:b], k[a:b], cache, a), expected[a:b, :b])
    assert cache.blocks.shape[0] == T // 4 and cache.pending.shape[0] == T % 4
