"""Per-sequence decoding state: a KV cache per attention layer (with QSA's index keys where the
layer selects what it attends to), conv window + recurrent state per linear-attention layer, the
n-gram embeddings' token history, and the position. Cloneable, so a prefix can be reused by the
next turn."""

from __future__ import annotations

import copy
import heapq
import weakref
from typing import Callable

import torch


class KVCache:
    """Keys and values of one attention layer; storage grows by doubling, so appends are amortised O(T).

    Eager use appends at `length`. While a CUDA graph replays the decode step, the write position
    is a device tensor instead (the step context's graph_position, runtime/graphs.py) and the
    attention kernel reads the buffer up to it: shapes stay fixed, as graphs need."""

    def __init__(self, kv_heads: int, head_dim: int, dtype: torch.dtype, device, capacity: int = 256):
        self.k = torch.zeros(capacity, kv_heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.length = 0

    def reserve(self, capacity: int) -> None:
        if capacity > self.k.shape[0]:
            for name in ("k", "v"):
                old = getattr(self, name)
                new = old.new_zeros(capacity, *old.shape[1:])
                new[: self.length] = old[: self.length]
                setattr(self, name, new)

    def make_room(self, end: int) -> None:
        """Storage for positions up to `end` (doubling, so appends stay amortised O(1))."""
        if end > self.k.shape[0]:
            self.reserve(max(end, 2 * self.k.shape[0]))

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the new keys/values (eagerly: a graph's attention writes them itself, at the
        device positions, and leaves `length` to the graph's runner); return (keys, values, mask)
        for attention over the sequence."""
        start, end = self.length, self.length + k.shape[0]
        self.make_room(end)
        self.k[start:end] = k
        self.v[start:end] = v
        self.length = end
        mask = None
        if k.shape[0] > 1:  # query i (position start + i) sees keys 0 .. start + i
            mask = torch.arange(end, device=k.device)[None, :] <= (start + torch.arange(k.shape[0], device=k.device))[:, None]
        return self.k[:end], self.v[:end], mask

    @property
    def nbytes(self) -> int:
        return 2 * self.length * self.k[0].numel() * self.k.element_size()

    def load(self, other: "KVCache") -> None:
        """Take `other`'s positions into this cache's storage."""
        self.make_room(other.length)
        self.k[: other.length] = other.k[: other.length]
        self.v[: other.length] = other.v[: other.length]
        self.length = other.length

    def clone(self) -> "KVCache":
        """A copy holding just the used positions (the doubling headroom is not copied)."""
        new = copy.copy(self)
        new.k, new.v = self.k[: max(self.length, 1)].clone(), self.v[: max(self.length, 1)].clone()
        return new


class IndexedKVCache(KVCache):
    """A KV cache with the QSA indexer's keys (layers/indexer.py): one compressed key per complete
    block of positions (pooled, normed, rotated at the block's first position), and the raw index
    keys of the block still filling. Each block is compressed once, when its last position arrives."""

    def __init__(self, kv_heads: int, head_dim: int, index_dim: int, dtype: torch.dtype, device):
        super().__init__(kv_heads, head_dim, dtype, device)
        self.blocks = torch.zeros(0, index_dim, dtype=dtype, device=device)
        self.pending = torch.zeros(0, index_dim, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return super().nbytes + (self.blocks.numel() + self.pending.numel()) * self.blocks.element_size()

    def clone(self) -> "IndexedKVCache":
        new = super().clone()
        new.blocks, new.pending = self.blocks.clone(), self.pending.clone()
        return new


class LinearState:
    """Gated DeltaNet state: the last kernel-1 conv inputs and the fp32 recurrent state [Hv, dk, dv].
    In a StatePool, row `row` of `stack` (every slot's windows and states of this layer, stacked):
    a batch of slots 0 .. B-1 is then one tensor to the fused step (kernels/deltanet_step.py)."""

    def __init__(self, conv_kernel: int, conv_dim: int, v_heads: int, k_dim: int, v_dim: int, dtype: torch.dtype, device):
        self.conv = torch.zeros(conv_kernel - 1, conv_dim, dtype=dtype, device=device)
        self.recurrent = torch.zeros(v_heads, k_dim, v_dim, dtype=torch.float32, device=device)
        self.stack: tuple[torch.Tensor, torch.Tensor] | None = None
        self.row = 0

    @staticmethod
    def stack_rows(states: list["LinearState"]) -> None:
        """Move `states` into one conv and one recurrent tensor, state i at row i."""
        stack = convs, recurrents = torch.stack([s.conv for s in states]), torch.stack([s.recurrent for s in states])
        for i, s in enumerate(states):
            s.conv, s.recurrent, s.stack, s.row = convs[i], recurrents[i], stack, i

    @property
    def nbytes(self) -> int:
        return self.conv.numel() * self.conv.element_size() + self.recurrent.numel() * 4

    def load(self, other: "LinearState") -> None:
        self.conv.copy_(other.conv)
        self.recurrent.copy_(other.recurrent)

    def clone(self) -> "LinearState":
        new = copy.copy(self)
        new.conv, new.recurrent, new.stack = self.conv.clone(), self.recurrent.clone(), None
        return new


class NgramState:
    """A per-layer embedding's history (layers/ple.py): the last order-1 token ids (EOS before the
    sequence's start), and its dilated conv's last inputs. The ids stay on the host whatever the
    device: the host hashes the n-grams (it reads their rows), from ids it fed itself."""

    def __init__(self, context: int, eos: int, conv_window: int, channels: int, dtype: torch.dtype, device):
        self.ids = torch.full((context,), eos, dtype=torch.long)
        self.conv = torch.zeros(conv_window, channels, dtype=dtype, device=device)

    @property
    def nbytes(self) -> int:
        return self.ids.numel() * 8 + self.conv.numel() * self.conv.element_size()

    def clone(self) -> "NgramState":
        new = copy.copy(self)
        new.ids, new.conv = self.ids.clone(), self.conv.clone()
        return new


class SequenceState:
    """One sequence: its position, each layer's mixer state, and the n-gram history of the layers
    with per-layer embeddings, by layer index (the model's new_state builds it). `tokens`: every id
    fed so far, from which Engine.recompute rebuilds the rest after Engine.release freed it (a
    preempted sequence). `slot`: the StatePool slot whose buffers it holds, if any."""

    def __init__(self, layers: list, ngrams: dict[int, NgramState] | None = None):
        self.position = 0
        self.layers = layers
        self.ngrams = ngrams or {}
        self.tokens: list[int] = []
        self.slot: int | None = None
        self.leave_slot: Callable[[], None] = _nothing  # gives the slot back (StatePool.acquire sets it)

    def advance_graphed(self, token: int) -> None:
        """`token` written by a replayed graph: eager writes advance the KV caches themselves."""
        self.position += 1
        self.tokens.append(token)
        for cache in self.layers:
            if isinstance(cache, KVCache):
                cache.length += 1

    def clone(self) -> "SequenceState":
        """A copy in buffers of its own (never a pool slot's)."""
        new = copy.copy(self)
        new.layers = [layer.clone() for layer in self.layers]
        new.ngrams = {i: state.clone() for i, state in self.ngrams.items()}
        new.tokens = list(self.tokens)
        new.slot, new.leave_slot = None, _nothing
        return new

    def load(self, other: "SequenceState") -> None:
        """Take `other`'s position, tokens and states into this one's buffers (a cached prefix into
        a pool slot)."""
        for mine, theirs in zip([*self.layers, *self.ngrams.values()], [*other.layers, *other.ngrams.values()]):
            mine.load(theirs)
        self.position, self.tokens = other.position, list(other.tokens)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in [*self.layers, *self.ngrams.values()])


def _nothing() -> None:
    pass


class StatePool:
    """Decoding states allocated once, for batched decode on the GPU (Engine.forward_batch): `slots`
    sequences' KV caches, reserved to `capacity` positions and one more (the scratch position where
    an idle slot's step writes), and their DeltaNet states. A sequence takes a free slot's buffers
    (`acquire`, the lowest free slot) and gives them back when released or dropped. A batch's
    decode graph is recorded per bucket of slots [0, b) and replayed whichever sequences hold them
    (runtime/graphs.py): a sequence joining or leaving copies nothing and records nothing. A slot
    whose sequence outgrows it grows alone (`make_room`), the others keep their size."""

    def __init__(self, new_state: Callable[[], SequenceState], slots: int, capacity: int):
        self.slots = [new_state() for _ in range(slots)]  # the buffers, as states the graphs record on
        for i in range(slots):
            self.make_room(i, capacity)
        for layer, state in enumerate(self.slots[0].layers):
            if isinstance(state, LinearState):
                LinearState.stack_rows([slot.layers[layer] for slot in self.slots])
        self._free = list(range(slots))
        self._holders: list[weakref.ref | None] = [None] * slots

    @staticmethod
    def limit(state: SequenceState) -> int:
        """A pooled state's scratch position: the last of its KV buffers (every attention layer's
        is the same size), below which it decodes."""
        sizes = {c.k.shape[0] for c in state.layers if isinstance(c, KVCache)}
        return min(sizes) - 1 if sizes else 1 << 62

    def make_room(self, slot: int, positions: int) -> None:
        """Slot `slot`'s KV caches for `positions` positions and the scratch one (doubling)."""
        for cache in self.slots[slot].layers:
            if isinstance(cache, KVCache):
                cache.make_room(positions + 1)

    def acquire(self, state: SequenceState) -> bool:
        """Give `state` (a new sequence's, or a released one's) the lowest free slot's buffers,
        reset; False if every slot is taken. The slot comes back on release or when `state` is dropped."""
        if not self._free:
            return False
        i = heapq.heappop(self._free)
        layers = self.slots[i].layers
        for layer in layers:
            if isinstance(layer, KVCache):
                layer.length = 0
            else:
                layer.conv.zero_()
                layer.recurrent.zero_()
        state.layers, state.ngrams, state.slot = layers, {}, i
        self._holders[i] = weakref.ref(state)
        state.leave_slot = weakref.finalize(state, self._give_back, i)
        return True

    def _give_back(self, i: int) -> None:
        self._holders[i] = None
        heapq.heappush(self._free, i)

    def holders(self, slots: int) -> list[SequenceState | None]:
        """The sequences holding slots 0 .. slots - 1 (None where free)."""
        return [None if ref is None else ref() for ref in self._holders[:slots]]

    @property
    def free(self) -> int:
        return len(self._free)
