"""The KV cache of `Coconut`'s passes: `WriteOnceLayer` writes each pass's keys and values once into buffers of
the final length, and `forked` lets the Jacobi passes run against the cache without writing into it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


def forked(cache: Cache) -> Cache:
    """A cache that starts from `cache`'s filled columns and grows by concatenation (`DynamicLayer`): a pass run
    against it attends to those columns as against `cache` and leaves `cache` as it was.

    Rolling `cache` back after a pass instead would let the next pass write over columns whose keys and values the
    earlier pass's attention saved for backward (`_Append` relies on no column being written twice); the fork's
    price is one copy of the cached columns per layer and pass.
    """
    layers = []
    for layer in cache.layers:
        fork = DynamicLayer()
        fork.lazy_initialization(layer.keys, layer.values)
        fork.keys, fork.values = layer.keys, layer.values
        layers.append(fork)
    return Cache(layers=layers)


class WriteOnceLayer(DynamicLayer):
    """A KV-cache layer that writes each pass's keys and values once into buffers of the final length and hands
    attention a view of the filled columns.

    `DynamicCache` concatenates instead: every pass copies the whole cache, and autograd keeps each copy alive for
    the backward of the attention that read it, so n latent passes held n copies of the growing cache (and
    generation copied it once per token). Here all passes share one buffer per layer.
    """

    def __init__(self, length: int) -> None:
        super().__init__()
        self.length = length

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.key_buffer = key_states.new_empty(*key_states.shape[:2], self.length, key_states.shape[3])
        self.value_buffer = value_states.new_empty(*value_states.shape[:2], self.length, value_states.shape[3])
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, ...]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.get_seq_length() + key_states.shape[2] > self.length:
            raise ValueError(f"the KV cache holds {self.length} columns; this pass would go past them")
        if torch.is_grad_enabled():
            self.keys = _Append.apply(self.key_buffer, self.keys, key_states)
            self.values = _Append.apply(self.value_buffer, self.values, value_states)
        else:  # generation: no gradient to route, and a plain write costs a third of the autograd.Function's call
            start = self.get_seq_length()
            end = start + key_states.shape[2]
            self.key_buffer[:, :, start:end], self.value_buffer[:, :, start:end] = key_states, value_states
            self.keys, self.values = self.key_buffer[:, :, :end], self.value_buffer[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]


class _Append(torch.autograd.Function):
    """Write `new` into `buffer` after the `earlier` columns and return all filled columns, with the gradient
    routed as `torch.cat([earlier, new], 2)` routes it, but without copying the earlier columns."""

    @staticmethod
    def forward(ctx, buffer: torch.Tensor, earlier: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        start = 0 if earlier is None else earlier.shape[2]
        end = start + new.shape[2]
        buffer[:, :, start:end] = new
        ctx.start = start
        # Writes only ever go to columns no earlier view covers, so a view autograd saved for backward keeps the
        # values it was computed with. `.data` gives the view its own version counter, so that those later writes
        # into `buffer` do not trip autograd's check that saved tensors were not modified.
        return buffer.data[:, :, :end]

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor]:
        return None, grad[:, :, : ctx.start] if ctx.start else None, grad[:, :, ctx.start :]
