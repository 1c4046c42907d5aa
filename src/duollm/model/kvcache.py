"""Key/value caches for generation: the interface ``DuoModel`` uses, a growing one and a static one.

The model asks a cache three things: ``length`` (tokens seen before this forward), ``seen(layer)``
(layers before ``layer`` already hold this forward's tokens) and ``update(layer, k, v)`` (append this
forward's keys and values, return all of them). ``duollm.integrations.hf`` adapts transformers' ``Cache`` to it.

``KVCache`` grows by concatenation: simple, but every decoded token copies the whole cache of every
layer (quadratic in the generated length). ``StaticKVCache`` preallocates ``max_len`` positions once
and writes each forward's keys and values in place; ``update`` returns views of the filled part, so a
decode step copies one position per layer (issue 14).

Tensor legend (``docs/NOTATION.md``): B batch, K key/value heads, T positions, E head width.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of past positions, one entry per layer, grown by concatenation."""

    def __init__(self, n_layers: int):
        self.k = [None] * n_layers
        self.v = [None] * n_layers

    @property
    def length(self) -> int:
        return self.seen(0)

    def seen(self, layer: int) -> int:
        """Positions cached at ``layer`` (layers before it already hold this forward's tokens)."""
        return 0 if self.k[layer] is None else self.k[layer].shape[2]

    def update(self, layer: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor):
        if self.k[layer] is not None:
            k_BKTE = torch.cat([self.k[layer], k_BKTE], dim=2)
            v_BKTE = torch.cat([self.v[layer], v_BKTE], dim=2)
        self.k[layer], self.v[layer] = k_BKTE, v_BKTE
        return k_BKTE, v_BKTE


class StaticKVCache:
    """``max_len`` positions per layer allocated up front (on the first update, in the keys' dtype and
    device); a forward writes its positions in place and attends to a view of the filled ones."""

    def __init__(self, n_layers: int, max_len: int):
        if max_len < 1:
            raise ValueError(f"a static cache needs max_len >= 1; got {max_len}")
        self.max_len = max_len
        self.k_LBKTE: list[torch.Tensor | None] = [None] * n_layers
        self.v_LBKTE: list[torch.Tensor | None] = [None] * n_layers
        self.filled = [0] * n_layers

    @property
    def length(self) -> int:
        return self.filled[0]

    def seen(self, layer: int) -> int:
        return self.filled[layer]

    def update(self, layer: int, k_BKTE: torch.Tensor, v_BKTE: torch.Tensor):
        B, K, T, E = k_BKTE.shape
        start, stop = self.filled[layer], self.filled[layer] + T
        if stop > self.max_len:
            raise ValueError(f"the static cache holds {self.max_len} positions; this forward needs {stop}")
        if self.k_LBKTE[layer] is None:
            self.k_LBKTE[layer] = k_BKTE.new_empty(B, K, self.max_len, E)
            self.v_LBKTE[layer] = v_BKTE.new_empty(B, K, self.max_len, v_BKTE.shape[-1])
        k_all, v_all = self.k_LBKTE[layer], self.v_LBKTE[layer]
        assert k_all.shape[0] == B, "a static cache serves one batch"
        k_all[:, :, start:stop] = k_BKTE
        v_all[:, :, start:stop] = v_BKTE
        self.filled[layer] = stop
        return k_all[:, :, :stop], v_all[:, :, :stop]
