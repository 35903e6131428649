"""The non-matmul operations of a one-token Llama decode step, Triton on CUDA or PyTorch elsewhere.

On CUDA the step runs `rms_norm` and `silu_mul` (float weights only: the W4 kernel computes them
itself as it loads its input) and `rope_attention`; `rope_kv` and `attention` are its PyTorch
parts. Both versions read the position from a device tensor and never synchronize, so a step made of
them can be captured once in a CUDA graph and replayed per token.

Shapes (batch 1): x, h [1, H]; qkv [1, (HQ + 2·HKV)·D] as q_proj|k_proj|v_proj; cos, sin float32
[L, D/2]; pos int64 [1] (the position being written); k_cache, v_cache [HKV, L, D]; q [HQ, D];
attention output [1, HQ·D]; gu [1, 2·I] as gate|up.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .linear import _TRITON


def _fast(t: torch.Tensor) -> bool:
    return _TRITON and t.is_cuda and t.dtype in (torch.float16, torch.bfloat16)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """w · (x / rms(x)), rounded to x's dtype before the scale, as transformers' RMSNorm does."""
    if _fast(x):
        from . import triton_decode
        return triton_decode.rms_norm(x, w, eps)
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope_kv(qkv, cos, sin, pos, k_cache, v_cache, hq: int, hkv: int) -> torch.Tensor:
    """Rotate q and k at position `pos`, write k and v into the caches there; returns q [HQ, D]."""
    D = k_cache.shape[2]
    heads = qkv.view(hq + 2 * hkv, D)
    c, s = cos.index_select(0, pos), sin.index_select(0, pos)  # [1, D/2]
    x1, x2 = heads[: hq + hkv, : D // 2].float(), heads[: hq + hkv, D // 2:].float()
    rot = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).to(qkv.dtype)
    k_cache.index_copy_(1, pos, rot[hq:].unsqueeze(1))
    v_cache.index_copy_(1, pos, heads[hq + hkv:].unsqueeze(1))
    return rot[:hq]


def attention(q, k_cache, v_cache, pos, scale: float) -> torch.Tensor:
    """Softmax attention of q over cache positions 0..pos (grouped-query heads) -> [1, HQ·D]."""
    hq, D = q.shape
    hkv, L = k_cache.shape[0], k_cache.shape[1]
    k = k_cache.repeat_interleave(hq // hkv, 0).float()  # [HQ, L, D]
    v = v_cache.repeat_interleave(hq // hkv, 0).float()
    scores = torch.einsum("hd,hld->hl", q.float(), k) * scale
    scores = scores.masked_fill(torch.arange(L, device=q.device) > pos, float("-inf"))
    o = torch.einsum("hl,hld->hd", scores.softmax(-1), v)
    return o.to(q.dtype).reshape(1, hq * D)


def rope_attention(qkv, cos, sin, pos, k_cache, v_cache, hq: int, hkv: int, scale: float) -> torch.Tensor:
    """`rope_kv` then `attention`, one launch on CUDA -> [1, HQ·D]."""
    if _fast(qkv):
        from . import triton_decode
        return triton_decode.rope_attention(qkv, cos, sin, pos, k_cache, v_cache, hq, hkv, scale)
    return attention(rope_kv(qkv, cos, sin, pos, k_cache, v_cache, hq, hkv), k_cache, v_cache, pos, scale)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) · up for gu = gate|up -> [1, I]."""
    if _fast(gu) and gu.shape[0] == 1:
        from . import triton_decode
        return triton_decode.silu_mul(gu)
    g, u = gu.chunk(2, dim=-1)
    return F.silu(g) * u


def next_token_(logits: torch.Tensor, tok: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor) -> None:
    """Greedy step bookkeeping in place: tok = argmax(logits) (first maximum), tokens[pos + 1] = tok, pos += 1.

    Shapes: logits [1, V]; tok, pos int64 [1]; tokens int64 [L + 1]."""
    if _fast(logits) and logits.shape[0] == 1 and logits.is_contiguous():
        from . import triton_decode
        return triton_decode.next_token_(logits, tok, tokens, pos)
    nxt = logits.argmax(-1)
    tokens.index_copy_(0, pos + 1, nxt)
    tok.copy_(nxt)
    pos.add_(1)
