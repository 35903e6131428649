"""Run quantized models: load a lowbit checkpoint with packed INT4 layers, and decode fast.

`load` turns a compressed-tensors pack-quantized checkpoint (what lowbit writes) into a
transformers model whose quantized linears are `QuantLinear`: the weights stay packed, a Triton
kernel multiplies on CUDA, and CPU dequantizes on the fly.

`Decoder` is a batch-1 greedy decode path for Llama-family models whose time is the weights':
a static KV cache, the step fused into 5 launches per layer for W4 weights (q|k|v and gate|up
as one matmul each; the RMSNorms and SiLU·up computed by the W4 kernel as it loads its input;
residual adds folded into the o/down matmuls; RoPE, the cache write and attention in one
kernel), 8 for float weights (separate RMSNorm and SiLU·mul kernels around cuBLAS), captured
once as a CUDA graph and replayed per token. transformers' own loop launches ~45 small kernels
per layer per token from Python, which at batch 1 costs more than reading the weights.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LowbitError
from .kernels import QuantLinear, decode_ops

log = logging.getLogger(__name__)


# ---- loading ---------------------------------------------------------------------------------

def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers 5.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _weights_args(config) -> dict:
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        raise LowbitError("the checkpoint has no quantization_config; load unquantized checkpoints with "
                          "transformers (or lowbit.eval.evaluate.load_causal_lm)")
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("format") != "pack-quantized" or not qc.get("config_groups"):
        raise LowbitError(f"lowbit.load reads compressed-tensors pack-quantized checkpoints, not format "
                          f"{qc.get('format')!r}; load it with transformers instead")
    args = [g["weights"] for g in qc["config_groups"].values()]
    for a in args:
        if a.get("num_bits") != 4 or a.get("type", "int") != "int" or a.get("actorder"):
            raise LowbitError(f"lowbit.load runs 4-bit int weights (no act-order); this checkpoint has "
                              f"{a.get('num_bits')}-bit {a.get('type')}; load it with transformers instead")
    return args[0]


def _dtype(value, default: torch.dtype) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return getattr(torch, value)
    return default


def load(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> nn.Module:
    """A lowbit compressed-tensors checkpoint as a transformers causal LM with `QuantLinear` layers.

    The model is built without initializing weights, every ``*.weight_packed`` linear becomes a
    QuantLinear, the other tensors load as usual, and the model moves to `device` in eval mode.
    `dtype` (default: the checkpoint's) is the activation dtype; use fp16/bf16 on CUDA for the kernel.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model.source import WeightStore, resolve_model_dir

    model_dir = resolve_model_dir(str(path))
    config = AutoConfig.from_pretrained(model_dir)
    _weights_args(config)
    dtype = dtype or _dtype(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None), torch.float32)
    config = copy.deepcopy(config)
    del config.quantization_config
    with _no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    store = WeightStore(model_dir)
    quantized = sorted(k.removesuffix(".weight_packed") for k in store.keys() if k.endswith(".weight_packed"))
    for mpath in quantized:
        old = model.get_submodule(mpath)
        if not isinstance(old, nn.Linear):
            raise LowbitError(f"{mpath} holds packed weights but is a {type(old).__name__} in the model")
        if f"{mpath}.weight_g_idx" in store:
            raise LowbitError(f"{mpath}: act-order (g_idx) checkpoints are not supported by lowbit.load")
        zp = f"{mpath}.weight_zero_point"
        bias = store.get(f"{mpath}.bias").to(dtype) if f"{mpath}.bias" in store else None
        new = QuantLinear.from_checkpoint(store.get(f"{mpath}.weight_packed"), store.get(f"{mpath}.weight_scale"),
                                          store.get(f"{mpath}.weight_shape").tolist(),
                                          store.get(zp) if zp in store else None, bias)
        if (new.out_features, new.in_features) != (old.out_features, old.in_features):
            raise LowbitError(f"{mpath}: checkpoint shape {(new.out_features, new.in_features)} does not match "
                              f"the config's {(old.out_features, old.in_features)}")
        model.set_submodule(mpath, new)

    prefixes = tuple(p + "." for p in quantized)
    rest = {k: store.get(k) for k in store.keys() if not k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    if unexpected:
        raise LowbitError(f"{model_dir}: tensors the model does not have: {', '.join(unexpected[:5])}")
    state = model.state_dict()
    loaded = {t.data_ptr() for k, t in state.items() if k in rest}
    untied = [k for k in missing if not k.startswith(prefixes) and state[k].data_ptr() not in loaded]
    if untied:
        raise LowbitError(f"{model_dir} lacks tensors the model needs: {', '.join(untied[:5])}")
    return model.to(device).eval()


def quantize_linears_(model: nn.Module, fmt, names: list[str] | None = None) -> nn.Module:
    """Replace nn.Linear modules by QuantLinear quantized on `fmt` (RTN) in place, one at a time.

    `names` defaults to every linear inside the decoder layers (not the lm_head), as lowbit's
    pipeline quantizes them. For in-memory experiments; checkpoints come from `lowbit.quantize`.
    """
    if names is None:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in f".{n}"]
    for n in names:
        model.set_submodule(n, QuantLinear.from_linear(model.get_submodule(n), fmt))
    return model


# ---- fast decoding ---------------------------------------------------------------------------

_DECODER_TYPES = ("llama", "mistral", "qwen2")
_ROPE_TYPES = ("default", "llama3", "linear", "yarn")


def _fuse(linears: list[nn.Module]) -> nn.Module:
    """Several linears of one input as one, outputs side by side (q|k|v, gate|up)."""
    if all(isinstance(l, QuantLinear) for l in linears):
        return QuantLinear.cat(linears)
    if any(isinstance(l, QuantLinear) for l in linears):
        raise LowbitError("fusing a mix of quantized and float linears is not supported")
    w = torch.cat([l.weight.detach() for l in linears])
    fused = nn.Linear(w.shape[1], w.shape[0], bias=any(l.bias is not None for l in linears), device="meta")
    fused.weight = nn.Parameter(w, requires_grad=False)
    if fused.bias is not None:
        fused.bias = nn.Parameter(torch.cat([l.bias.detach() if l.bias is not None else w.new_zeros(l.out_features)
                                             for l in linears]), requires_grad=False)
    return fused


def _norm_linear(lin: nn.Module, h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """lin(rms_norm(h) · w): one kernel for a QuantLinear (it normalizes as it loads h), two otherwise."""
    if isinstance(lin, QuantLinear):
        return lin(h, norm=(w, eps))
    return lin(decode_ops.rms_norm(h, w, eps))


def _add_linear(lin: nn.Module, x: torch.Tensor, out: torch.Tensor, glu: bool = False) -> None:
    """out += lin(x), or out += lin(silu(gate) · up) of x = gate|up with glu, in one kernel where the
    backend allows."""
    if isinstance(lin, QuantLinear):
        lin(x, accumulate_into=out, glu=glu)
        return
    if glu:
        x = decode_ops.silu_mul(x)
    out.addmm_(x, lin.weight.t())
    if lin.bias is not None:
        out.add_(lin.bias)


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: nn.Module
    o: nn.Module
    ln2: torch.Tensor
    gate_up: nn.Module
    down: nn.Module


def _nbytes(m: nn.Module | torch.Tensor) -> int:
    ts = [m] if isinstance(m, torch.Tensor) else [*m.parameters(), *m.buffers()]
    return sum(t.numel() * t.element_size() for t in ts)


class Decoder:
    """Greedy batch-1 decoding of a Llama-family model (llama, mistral, qwen2), float or QuantLinear.

    Shapes: input_ids [1, T] (or [T]); returns [1, T + max_new_tokens]. The prompt is fed one token
    per step (a decode-only path: fine for short prompts). `use_graph` (default: on CUDA) captures
    the step as a CUDA graph on first use. `max_len` bounds prompt + new tokens (the KV cache size).
    """

    def __init__(self, model: nn.Module, max_len: int, use_graph: bool | None = None):
        cfg = model.config
        if cfg.model_type not in _DECODER_TYPES:
            raise LowbitError(f"Decoder supports {', '.join(_DECODER_TYPES)} models, not {cfg.model_type!r}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise LowbitError(f"Decoder needs a SiLU MLP, not {cfg.hidden_act!r}")
        inner = model.model
        rot = inner.rotary_emb
        if getattr(rot, "rope_type", "default") not in _ROPE_TYPES:
            raise LowbitError(f"Decoder supports RoPE types {', '.join(_ROPE_TYPES)}, not {rot.rope_type!r}")
        window = getattr(cfg, "sliding_window", None)
        if window and getattr(cfg, "use_sliding_window", True) and max_len > window:
            raise LowbitError(f"max_len {max_len} exceeds the sliding window {window}; Decoder has no window")
        emb = inner.embed_tokens.weight
        dev, self.dtype = emb.device, emb.dtype
        self.hq, self.hkv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.d = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.hq
        self.scale = self.d ** -0.5
        self.eps = cfg.rms_norm_eps
        self.max_len = max_len
        self.embed, self.norm, self.lm_head = emb.detach(), inner.norm.weight.detach(), model.lm_head
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(_Layer(layer.input_layernorm.weight.detach(), _fuse([a.q_proj, a.k_proj, a.v_proj]),
                                      a.o_proj, layer.post_attention_layernorm.weight.detach(),
                                      _fuse([m.gate_proj, m.up_proj]), m.down_proj))
        with torch.no_grad():
            t = torch.arange(max_len, device=dev, dtype=torch.float32)
            freqs = t[:, None] * rot.inv_freq.to(dev, torch.float32)[None, :]
            scaling = float(getattr(rot, "attention_scaling", 1.0))
            self.cos, self.sin = (freqs.cos() * scaling).contiguous(), (freqs.sin() * scaling).contiguous()
            shape = (len(self.layers), self.hkv, max_len, self.d)
            self.k_cache = torch.zeros(shape, dtype=self.dtype, device=dev)
            self.v_cache = torch.zeros(shape, dtype=self.dtype, device=dev)
            self.tok = torch.zeros(1, dtype=torch.long, device=dev)
            self.pos = torch.zeros(1, dtype=torch.long, device=dev)
            self.tokens = torch.zeros(max_len + 1, dtype=torch.long, device=dev)
        self.logits: torch.Tensor | None = None
        self.use_graph = dev.type == "cuda" if use_graph is None else use_graph
        self.graph: torch.cuda.CUDAGraph | None = None

    def weight_bytes(self) -> int:
        """Bytes of weights one step reads (the embedding row aside)."""
        total = _nbytes(self.norm) + _nbytes(self.lm_head)
        for L in self.layers:
            total += sum(_nbytes(t) for t in (L.ln1, L.qkv, L.o, L.ln2, L.gate_up, L.down))
        return total

    def _step(self) -> None:
        """One token: reads tok at position pos, writes the argmax into tok and tokens[pos+1], pos += 1."""
        h = F.embedding(self.tok, self.embed)  # [1, H]
        for i, L in enumerate(self.layers):
            attn = decode_ops.rope_attention(_norm_linear(L.qkv, h, L.ln1, self.eps), self.cos, self.sin, self.pos,
                                             self.k_cache[i], self.v_cache[i], self.hq, self.hkv, self.scale)
            _add_linear(L.o, attn, h)
            _add_linear(L.down, _norm_linear(L.gate_up, h, L.ln2, self.eps), h, glu=True)
        self.logits = _norm_linear(self.lm_head, h, self.norm, self.eps)  # [1, V]
        decode_ops.next_token_(self.logits, self.tok, self.tokens, self.pos)

    def _capture(self) -> None:
        self.pos.zero_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: compiles and tunes every kernel before capture
            for _ in range(2):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._step()
        self.graph = graph

    @torch.inference_mode()
    def tune(self, steps: int = 32) -> dict:
        """Re-choose the W4 kernels' configurations by the time of the whole captured step (CUDA;
        a no-op elsewhere or without QuantLinear layers). Returns shape key -> configuration.

        Each candidate of one shape is timed over `steps` replays with the other shapes fixed, one
        shape after another; the prompt state is reset (call before `prefill`)."""
        if not (self.use_graph and torch.cuda.is_available() and self.embed.is_cuda):
            return {}
        from .kernels import triton_w4a16
        with triton_w4a16.shapes_seen() as keys:
            self.graph = None
            self._capture()
        if not keys:
            return {}
        steps = max(1, min(steps, self.max_len - 2))

        def step_time() -> float:
            self.graph = None
            self._capture()
            self.pos.zero_()
            self.tok.zero_()
            self.graph.replay()  # one replay out of the timing: the first after a capture is slower
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(steps):
                self.graph.replay()
            b.record()
            b.synchronize()
            return a.elapsed_time(b)

        chosen = triton_w4a16.retune(keys, step_time)
        self.graph = None
        return chosen

    def _run(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor) -> int:
        """Feed the prompt from position 0; returns its length T (the first new token is tokens[T])."""
        ids = input_ids.reshape(-1).to(self.tok.device)
        if ids.numel() >= self.max_len:
            raise LowbitError(f"prompt of {ids.numel()} tokens does not fit max_len {self.max_len}")
        if self.use_graph and self.graph is None:
            self._capture()
        self.pos.zero_()
        for t in range(ids.numel()):
            self.tok.copy_(ids[t:t + 1])
            self._run()
        self._prompt = ids
        return ids.numel()

    @torch.inference_mode()
    def decode(self, n: int) -> None:
        """n more greedy steps after `prefill` (or a previous `decode`)."""
        for _ in range(n):
            self._run()

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        T = input_ids.numel()
        if T + max_new_tokens > self.max_len:
            raise LowbitError(f"{T} + {max_new_tokens} tokens exceed max_len {self.max_len}")
        self.prefill(input_ids)
        self.decode(max_new_tokens - 1)
        return torch.cat([self._prompt, self.tokens[T:T + max_new_tokens]])[None]

