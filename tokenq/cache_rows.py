"""Decoding rows moved between batches: copying KV-cache rows out of one or several caches into a new one.

HF caches can drop or repeat rows in place (`batch_select_indices`, `batch_repeat_interleave`) but not copy rows out
of a batch, nor join rows of different lengths into one batch. The searches need both: a row that stopped (at a step
boundary, or at its end) is set aside while the others decode on, and tree search gathers nodes decoded in
different expansions. A gathered batch is padded at the end with holes (attention mask 0); positions are explicit
(`tokenq.steering.explicit_positions`), so the holes change nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def cache_tensors(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of every layer, (R, heads, T, head_dim). The one place tokenq reads a cache's tensors:
    `DynamicCache` has no public accessor in transformers 5 (`cache.layers[i].keys` / `.values`); a release that
    renames them fails here, loudly (tests/test_tree_search.py reads and gathers caches on every run). Sliding-window
    layers drop old positions, which a gathered batch cannot line up: refused."""
    layers = getattr(cache, "layers", None)
    if layers is None or any(not hasattr(layer, "keys") or not hasattr(layer, "values") for layer in layers):
        raise RuntimeError("this transformers version's DynamicCache has no layers[i].keys / .values: tokenq's search "
                           "cannot move cache rows (tokenq.cache_rows.cache_tensors)")
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise ValueError("tokenq's search strategies need a full-attention KV cache: this model has sliding-window layers")
    return [(layer.keys, layer.values) for layer in layers]


def gather_cache(parts: list[tuple[DynamicCache, torch.Tensor]], length: int) -> DynamicCache:
    """A new cache with the rows `index` of each (cache, index) in `parts`, in order, padded at the end to `length`
    (a cache built from tensors: `DynamicCache(ddp_cache_data=...)`, public)."""
    layers = [cache_tensors(cache) for cache, _ in parts]

    def cat(layer: int, which: int) -> torch.Tensor:
        pieces = [tensors[layer][which][index] for tensors, (_, index) in zip(layers, parts)]
        return torch.cat([F.pad(t, (0, 0, 0, length - t.shape[2])) for t in pieces])

    return DynamicCache(ddp_cache_data=[(cat(i, 0), cat(i, 1)) for i in range(len(layers[0]))])


def concat_rows(parts: list[tuple[object, torch.Tensor]]):
    """The rows `index` of each (`tokenq.search.Rows`, index) in `parts`, in order, as one batch with fresh caches (no
    cache when the parts keep none)."""
    first = parts[0][0]
    length = max(rows.mask.shape[1] for rows, _ in parts)
    fields = {name: torch.cat([getattr(rows, name)[index] for rows, index in parts]) for name in first.TENSORS if name != "mask"}
    mask = torch.cat([F.pad(rows.mask[index], (0, length - rows.mask.shape[1])) for rows, index in parts])
    caches = {}
    for name in ("cache", "critic_cache"):
        kept = [(getattr(rows, name), index) for rows, index in parts]
        caches[name] = gather_cache(kept, length) if all(cache is not None for cache, _ in kept) else None
    return type(first)(mask=mask, **caches, **fields)
