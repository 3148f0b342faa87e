"""Per-layer n-gram embeddings against transformers' Qwen4-Exp PLE layer: the hash's constants, the
rows it reads across document boundaries, and the whole layer, fed at once or in pieces."""

from concurrent.futures import Future

import pytest
import torch

from flashmoe.layers.ple import PerLayerEmbedding, hash_multipliers, head_table_sizes, shard_rows, table_rows
from flashmoe.models import args_from_dict

from ..conftest import FAMILY_CONFIGS, randomize
from ..test_parity import rel_err

LAYER = 2  # the second PLE layer: its heads' tables come after the first layer's


@pytest.fixture(scope="module")
def layers():
    """(transformers' PLE layer, ours with the same weights, our spec)."""
    import transformers as tf
    from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextPLELayer

    text = FAMILY_CONFIGS["qwen4_exp"]["text_config"]
    config = tf.Qwen4ExpTextConfig(**text)
    ref = Qwen4ExpTextPLELayer(config, LAYER, config.ple_layer_ids.index(LAYER + 1))
    randomize(ref, 3)
    spec = args_from_dict({**text, "model_type": "qwen4_exp_text"}).layer(LAYER).ple
    ours = PerLayerEmbedding(config.hidden_size, config.hc_count, spec, config.rms_norm_eps, True)
    weights = {k: v for k, v in ref.state_dict().items() if "ngram_embedding" not in k and "ngram_heads" not in k
               and "multipliers" not in k}
    ours.load_state_dict(weights)
    table = ref.ple_embedding.ngram_embedding.weight.detach()
    ours.ple_embedding.fetch_rows = lambda rows: done(table[rows])  # the table in memory, as a file's reads return it
    return ref, ours, spec


def done(value: torch.Tensor) -> Future:
    future = Future()
    future.set_result(value)
    return future


def test_hash_constants_are_transformers(layers):
    ref, _, spec = layers
    sizes = head_table_sizes(spec)
    assert hash_multipliers(spec) == ref.ple_embedding.layer_multipliers.tolist()
    assert sizes == ref.ple_embedding.ngram_heads_vocab_sizes.tolist()
    assert [sum(sizes[:h]) for h in range(len(sizes))] == ref.ple_embedding.ngram_heads_offsets.tolist()


def test_the_tables_shape_and_its_checkpoint_blocks_are_transformers(layers):
    ref, _, spec = layers
    rows = ref.ple_embedding.ngram_embedding.weight.shape[0]
    assert table_rows(spec) == rows
    assert shard_rows(spec) == [len(block) for block in torch.arange(rows).chunk(spec.shards)]


@torch.no_grad()
def test_the_layer_is_transformers_whole_and_in_pieces(layers):
    ref, ours, spec = layers
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, 64, (23,), generator=gen)
    ids[[5, 6, 14]] = spec.eos  # documents end: the n-grams after them restart
    x = torch.randn(23, ours.streams * ours.hidden, generator=gen)
    expected = ref(x[None], ids[None], None)[0]
    whole = run(ours, x, ids, [ours.new_state(torch.float32, "cpu")])
    assert rel_err(whole, expected) < 1e-5
    state, pieces = ours.new_state(torch.float32, "cpu"), []
    for a, b in [(0, 1), (1, 6), (6, 7), (7, 16), (16, 23)]:  # the history carried across an EOS and the conv's window
        pieces.append(run(ours, x[a:b], ids[a:b], [state]))
    assert rel_err(torch.cat(pieces), whole) < 1e-6


def run(ple: PerLayerEmbedding, x: torch.Tensor, ids: torch.Tensor, states: list) -> torch.Tensor:
    """The layer over one sequence's ids, as a model step runs it: the rows' reads started, then collected."""
    slices = [slice(0, ids.shape[0])]
    return ple(x, ple.start(ids, states, slices).result(), states, slices)
