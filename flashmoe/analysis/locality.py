"""The locality of a routing trace, and synthetic routing streams of any shape that reproduce it.

What decides a cache's hit rate is, per layer: how unevenly the experts are used (the popularity
distribution, as sorted load shares) and how soon an expert comes back (the reuse profile: the
share of a token's experts that one of the previous w tokens also used, for a few windows w).

The generator makes each token's K experts at a layer the top K of
    log weight[e] + Gumbel noise + bonus[band of the expert's age in tokens]
(without the bonus: sampling without replacement in proportion to the weights). The weights and
the per-band bonuses are calibrated by simulate-and-correct until the stream's popularity and reuse
profile match their targets. Expert ids of a generated stream are popularity ranks (0 = the most
used expert of its layer).

Carrying the statistics to another shape (E experts, K per token, L layers):
- popularity: the target's sorted shares follow the trace's cumulative share curve (the top x% of
  experts carry the same share of the load);
- reuse: part of a small layer's reuse is chance (8 of 64 experts repeat by chance far more often
  than 10 of 512). What carries over is kappa(w) = (U(w) - U0(w)) / (1 - U0(w)): of the experts
  that popularity alone would not have brought back within w tokens, the share that did come back
  (U0: the reuse of a popularity-only stream of the same shape; kappa is made non-decreasing in w,
  since a small layer's long windows are saturated by chance and say little). The target shape
  gets U0'(w) + kappa(w) (1 - U0'(w)). A uniform trace thus stays uniform at any shape; a trace of
  a 64-expert model cannot show how far beyond chance a 512-expert model's long-window reuse goes;
- layers: target layer i follows trace layer i * L_trace // L. Layers are drawn independently, so
  a trace's correlation between layers in *when* experts repeat (all of them at a change of
  topic) is not reproduced; it shows in LRU at tight capacities (docs/BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..experts.policy import SlotMap

WINDOWS = (1, 4, 16)  # reuse windows in tokens


def ages(ids: np.ndarray) -> np.ndarray:
    """ids [T, L, k] -> [T, L, k]: tokens since each chosen expert was last used at that layer
    (0 where it was never used before)."""
    T, L, k = ids.shape
    last = np.full((L, int(ids.max()) + 1), -1)
    out = np.zeros(ids.shape, dtype=np.int64)
    rows = np.arange(L)[:, None]
    for t in range(T):
        seen = last[rows, ids[t]]
        out[t] = np.where(seen >= 0, t - seen, 0)
        last[rows, ids[t]] = t
    return out


def reuse_profile(ids: np.ndarray, windows=WINDOWS) -> np.ndarray:
    """[L, len(windows)]: share of a token's experts that one of the previous w tokens used, over
    the tokens that have a full window behind them."""
    a = ages(ids)[max(windows) :]
    return np.stack([((a >= 1) & (a <= w)).mean(axis=(0, 2)) for w in windows], axis=1)


def rank_shares(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E]: the load share of each expert id, in id order (a generated stream's ids are ranks)."""
    counts = np.stack([np.bincount(ids[:, i].ravel(), minlength=num_experts) for i in range(ids.shape[1])])
    return counts / counts.sum(axis=1, keepdims=True)


def sorted_shares(ids: np.ndarray, num_experts: int) -> np.ndarray:
    """[L, E]: each layer's load shares, largest first (each row sums to 1)."""
    return -np.sort(-rank_shares(ids, num_experts), axis=1)


def load_entropy(shares: np.ndarray) -> np.ndarray:
    """[L]: entropy of each layer's load over log E (1 = uniform)."""
    p = np.where(shares > 0, shares, 1.0)
    return -(shares * np.log(p)).sum(axis=1) / np.log(shares.shape[1])


def rescale_shares(shares: np.ndarray, num_experts: int) -> np.ndarray:
    """Sorted shares [L, E] -> [L, num_experts] on the same cumulative curve (quantiles of experts)."""
    E = shares.shape[1]
    cdf = np.concatenate([np.zeros((len(shares), 1)), np.cumsum(shares, axis=1)], axis=1)
    x = np.arange(num_experts + 1) / num_experts * E
    new = np.stack([np.interp(x, np.arange(E + 1), row) for row in cdf])
    return np.diff(new, axis=1)


@dataclass
class Locality:
    """Per-layer statistics: sorted shares [L, E] and the reuse profile [L, len(WINDOWS)]."""

    shares: np.ndarray
    reuse: np.ndarray

    @classmethod
    def of(cls, ids: np.ndarray, num_experts: int) -> "Locality":
        return cls(sorted_shares(ids, num_experts), reuse_profile(ids))


class StreamGenerator:
    """Routing streams with a layer's popularity and reuse profile (see above); one row of
    parameters per layer: shares [L, E] (sorted, the target popularity), k experts per token."""

    def __init__(self, shares: np.ndarray, k: int, windows=WINDOWS, seed: int = 0):
        self.shares, self.k, self.windows = shares, k, tuple(windows)
        self.log_weights = np.log(np.maximum(shares, 1e-12))
        self.bonus = np.zeros((len(shares), len(windows)))
        self.target_reuse: np.ndarray | None = None  # what fit() aimed at
        self.rng = np.random.default_rng(seed)

    def generate(self, tokens: int, layers: int | None = None) -> np.ndarray:
        """[tokens, layers, k] int16 expert ranks; target layer i follows row i * rows // layers."""
        n = layers or len(self.shares)
        rows = np.arange(n) * len(self.shares) // n
        log_weights, E = self.log_weights[rows], self.shares.shape[1]
        L, w_max = len(rows), self.windows[-1]
        bonus = np.concatenate([self.bonus[rows], np.zeros((L, 1))], axis=1)  # extra band: older or never used
        band = np.searchsorted(self.windows, np.arange(1, w_max + 2))  # band of each age 1..w_max+1
        layer = np.arange(L)[:, None]
        last = np.full((L, E), -(w_max + 1))
        out = np.empty((tokens, L, self.k), dtype=np.int16)
        for t in range(tokens):
            age = np.minimum(t - last, w_max + 1)
            score = log_weights + self.rng.gumbel(size=(L, E)) + bonus[layer, band[age - 1]]
            out[t] = chosen = np.argpartition(-score, self.k - 1, axis=1)[:, : self.k]
            last[layer, chosen] = t
        return out

    def fit(self, reuse: np.ndarray | None = None, tokens: int = 2000, rounds: int = 16) -> np.ndarray:
        """Simulate and correct until streams have the target shares and reuse [L, windows]
        (None: popularity only, no bonus). Returns the reuse profile of the last stream."""
        E, self.target_reuse = self.shares.shape[1], reuse
        for _ in range(rounds):
            ids = self.generate(tokens)
            got = rank_shares(ids, E)
            self.log_weights += 0.7 * np.log(np.maximum(self.shares, 1e-12) / np.maximum(got, 0.1 / (tokens * self.k)))
            got_reuse = reuse_profile(ids, self.windows)
            if reuse is not None:
                self.bonus += 1.5 * (_logit(reuse) - _logit(got_reuse))
        return got_reuse


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-4, 1 - 1e-4)
    return np.log(p / (1 - p))


def fit_replay(trace_ids: np.ndarray, num_experts: int, target_experts: int, k: int, seed: int = 0,
               tokens: int = 2000) -> StreamGenerator:
    """A generator of streams of `target_experts` experts, `k` per token, with the popularity curve
    of trace ids [T, L, k0] (of a model with `num_experts`) and its reuse carried over by kappa."""
    loc = Locality.of(trace_ids, num_experts)
    gen = StreamGenerator(rescale_shares(loc.shares, target_experts), k, seed=seed)
    target = loc.reuse
    if (target_experts, k) != (num_experts, trace_ids.shape[2]):
        chance = StreamGenerator(loc.shares, trace_ids.shape[2], seed=seed + 1).fit(tokens=tokens, rounds=4)
        kappa = np.maximum.accumulate(np.clip((loc.reuse - chance) / np.maximum(1 - chance, 1e-9), 0, 1), axis=1)
        chance_there = gen.fit(tokens=tokens, rounds=4)
        target = chance_there + kappa * (1 - chance_there)
    gen.fit(target, tokens=tokens)
    return gen


def hit_rate(policy: str, capacity: int, ids: np.ndarray) -> float:
    """Hit rate of one cache tier of `capacity` experts (experts/policy.py, the code the tiers
    run) shared by all layers, under a routing stream [T, L, k] visited token by token, layer by layer."""
    slots = SlotMap(range(capacity), policy)
    hits = 0
    for token in ids.tolist():
        for layer, chosen in enumerate(token):
            slots.policy.tick()
            for e in chosen:
                key = (layer, e)
                slots.policy.touch(key)
                if key in slots:
                    hits += 1
                else:
                    slots.admit(key, set())
    return hits / ids.size
