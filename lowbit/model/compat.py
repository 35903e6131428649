"""Work-arounds for known bugs in the libraries lowbit loads checkpoints with.

compressed-tensors ≤ 0.20 builds the empty module for an asymmetric pack-quantized weight
with an unpacked zero point ([out, G] int8), while its own compressor (and vLLM) store it
packed ([out·b/32, G] int32), so transformers refuses such checkpoints with a size mismatch
(vllm-project/llm-compressor#1618). Inside lowbit's loader the meta shape is corrected.

transformers 5.x renamed the KV-cache argument and output field `past_key_values` to `cache`
(the old name is deprecated and goes away in a later 5.x): `cached_forward` speaks either.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import math
from typing import Iterator

import torch


@contextlib.contextmanager
def packed_zero_point_on_meta() -> Iterator[None]:
    from compressed_tensors.compressors.pack_quantized import base as pq

    original = pq.PackedQuantizationCompressor.compress.__func__

    def compress(cls, state_dict, scheme):
        out = original(cls, state_dict, scheme)
        zp = out.get("weight_zero_point")
        w = scheme.weights
        if zp is not None and zp.device.type == "meta" and not w.symmetric and w.strategy in pq.PACK_ZP_STRATS:
            rows = math.ceil(zp.shape[0] * w.num_bits / 32)
            out["weight_zero_point"] = torch.empty((rows, *zp.shape[1:]), dtype=torch.int32, device="meta")
        return out

    pq.PackedQuantizationCompressor.compress = classmethod(compress)
    try:
        yield
    finally:
        pq.PackedQuantizationCompressor.compress = classmethod(original)


@functools.cache
def _cache_name(model_class: type) -> str:
    """The KV-cache argument's name in this transformers (looked up once per class: decode steps are timed)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cached_forward(model, input_ids: torch.Tensor, cache=None):
    """model(input_ids) extending `cache` (None starts one); returns (logits [B, T, V], cache),
    under whichever name this transformers gives the KV cache (argument and output field alike)."""
    name = _cache_name(type(model))
    out = model(input_ids=input_ids, use_cache=True, **({name: cache} if cache is not None else {}))
    return out.logits, getattr(out, name)
