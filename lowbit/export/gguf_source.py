"""Where GGUF export reads weights from: a checkpoint directory, float or already quantized.

A source lists logical tensor names (HF names, ``<module>.weight`` for a packed linear) and gives
each as float32 (`float`) and, for quantized linears, as codes plus grid (`quantized`), so the
writer can convert codes directly where the GGUF grid holds them exactly (Q4_X) and dequantize
otherwise. Layouts read (module docstrings of lowbit/export/* describe them):

  float                 any safetensors checkpoint
  pack-quantized        compressed-tensors int weights (weight_packed/scale/zero_point/shape/g_idx)
  gptq                  GPTQ v1 (qweight/qzeros/scales/g_idx), zero = stored + 1
  awq                   AutoAWQ GEMM (qweight/qzeros/scales of Wᵀ, AWQ field order)

Other quantized layouts are refused, never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import LowbitError
from ..formats import QParams, QuantizedTensor
from ..formats.int import IntFormat
from ..model.source import WeightStore
from .gptq import unpack_int32, v1_zeros

_SUFFIXES = {
    "pack-quantized": ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"),
    "gptq": ("qweight", "qzeros", "scales", "g_idx"),
    "awq": ("qweight", "qzeros", "scales"),
}
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _kind(qcfg: dict | None, where: Path) -> tuple[str, int, bool]:
    """(layout, bits, symmetric) of a checkpoint's quantization_config."""
    if not qcfg:
        return "float", 0, False
    method = qcfg.get("quant_method")
    if method == "compressed-tensors":
        fmt = qcfg.get("format")
        if fmt in ("dense", None) and qcfg.get("quantization_status") != "compressed":
            return "float", 0, False
        groups = [g["weights"] for g in qcfg.get("config_groups", {}).values() if g.get("weights")]
        if fmt != "pack-quantized" or not groups or any(g != groups[0] for g in groups) \
                or groups[0].get("type") != "int":
            raise LowbitError(f"{where}: compressed-tensors {fmt} with these config groups is not read by GGUF "
                              "export (it reads int pack-quantized with one weight scheme)")
        return "pack-quantized", int(groups[0]["num_bits"]), bool(groups[0].get("symmetric"))
    if method == "gptq" and qcfg.get("checkpoint_format", "gptq") == "gptq":
        return "gptq", int(qcfg["bits"]), bool(qcfg.get("sym", False))
    if method == "awq" and qcfg.get("version", "gemm") == "gemm" and int(qcfg.get("bits", 4)) == 4:
        return "awq", 4, False
    variant = qcfg.get("checkpoint_format") or qcfg.get("version")
    raise LowbitError(f"{where}: quantization method {method!r} ({variant}) "
                      "is not read by GGUF export; it reads compressed-tensors, GPTQ v1 and AutoAWQ GEMM")


def _unpack_awq(t: torch.Tensor) -> torch.Tensor:
    """AutoAWQ int32 [rows, cols/8] -> [rows, cols] 4-bit values (inverse of its field order)."""
    u = t.to(torch.int64) & 0xFFFFFFFF
    fields = (u.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * 4)) & 0xF  # [rows, cols/8, 8]
    out = torch.empty_like(fields)
    out[:, :, list(_AWQ_ORDER)] = fields
    return out.reshape(t.shape[0], -1)


class CheckpointSource:
    """Logical tensors of a checkpoint directory (see the module docstring)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        self.store = WeightStore(self.dir)
        cfg = json.loads((self.dir / "config.json").read_text())
        self.kind, self.bits, self.sym = _kind(cfg.get("quantization_config"), self.dir)
        self._parts: dict[str, dict[str, str]] = {}
        suffixes = _SUFFIXES.get(self.kind, ())
        for name in self.store.keys():
            path, _, leaf = name.rpartition(".")
            if leaf in suffixes:
                self._parts.setdefault(f"{path}.weight", {})[leaf] = name
            else:
                self._parts[name] = {"": name}

    def names(self) -> list[str]:
        return list(self._parts)

    def __contains__(self, name: str) -> bool:
        return name in self._parts

    def gguf_type(self, name: str) -> str | None:
        """Block type fixed by stored GGUF codes (never, for a checkpoint directory)."""
        return None

    def shape(self, name: str) -> tuple[int, ...]:
        parts = self._parts[name]
        if "" in parts:
            return self.store.shape(parts[""])
        if self.kind == "pack-quantized":
            return tuple(int(v) for v in self.store.get(parts["weight_shape"]).tolist())
        rows, cols = self.store.shape(parts["qweight"])
        k = 32 // self.bits
        return (cols, rows * k) if self.kind == "gptq" else (cols * 8, rows)

    def quantized(self, name: str) -> QuantizedTensor | None:
        """Codes and grid of a packed linear (unsigned codes, W_r = (W_q − zero)·scale); None if float."""
        parts = self._parts[name]
        if "" in parts:
            return None
        t = {k: self.store.get(v) for k, v in parts.items()}
        if self.kind == "pack-quantized":
            out_f, in_f = (int(v) for v in t["weight_shape"])
            G = t["weight_scale"].shape[1]
            fmt = IntFormat(self.bits, in_f // G, self.sym)
            return fmt.unpack(t)
        if self.kind == "gptq":
            W_q = unpack_int32(t["qweight"], self.bits).T.contiguous()          # [out, in]
            zero = v1_zeros(t["qzeros"], self.bits)                             # [G, out]
            scale = t["scales"].float().T.contiguous()                          # [out, G]
            G, in_f = scale.shape[1], W_q.shape[1]
            g_idx = t["g_idx"].long()
            trivial = torch.equal(g_idx, torch.arange(in_f) // (in_f // G))
            return QuantizedTensor(W_q.to(torch.uint8), QParams(scale, zero.T.float().contiguous()),
                                   IntFormat(self.bits, in_f // G, self.sym), None if trivial else g_idx)
        W_q = _unpack_awq(t["qweight"]).T.contiguous()                          # [out, in]
        zero = _unpack_awq(t["qzeros"]).T.float().contiguous()                  # [out, G]
        scale = t["scales"].float().T.contiguous()
        return QuantizedTensor(W_q.to(torch.uint8), QParams(scale, zero),
                               IntFormat(4, W_q.shape[1] // scale.shape[1], False))

    def float(self, name: str) -> torch.Tensor:
        parts = self._parts[name]
        if "" in parts:
            return self.store.get(parts[""]).float()
        return self.quantized(name).dequantize()


def int4_group32(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(signed codes int [out, in] in −8..7, scales [out, in/32]) when `qt` is a symmetric INT4
    grid with contiguous groups of 32 (what Q4_0 blocks hold exactly); None otherwise."""
    fmt = qt.format
    if getattr(fmt, "name", None) != "int" or fmt.bits != 4:
        return None
    in_f = qt.W_q.shape[1]
    if in_f % 32 or fmt.group_length(in_f) != 32:
        return None
    if qt.g_idx is not None and not torch.equal(qt.g_idx.cpu().long(), torch.arange(in_f) // 32):
        return None
    if not torch.all(qt.qparams.zero == 8):
        return None
    return qt.W_q.to(torch.int64) - 8, qt.qparams.scale.float()

