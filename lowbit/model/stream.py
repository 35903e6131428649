"""Stream a causal LM layer by layer: only the embeddings and the layers in flight are in memory.

The model is built on the meta device from its config (buffers such as rotary frequencies are
real), so the architecture's own forward code computes masks and position embeddings; weights
are read from safetensors only for the module being run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LowbitError
from .arch import Family, family_for
from .source import WeightStore

log = logging.getLogger(__name__)


class _StopForward(Exception):
    pass


@dataclass
class Batch:
    """One calibration mini-batch in flight between layers.

    Shapes: hidden [b, seq, hidden]; layer_kwargs[i] holds what the model passes layer i
    (attention mask, position embeddings, ...), shared between layers where the model shares it.
    For a method that asks for the float model's stream (`Method.wants_float_stream`): `reference`
    is the float model's input to the current layer and `target` the float layer's output on it.
    """

    hidden: torch.Tensor
    layer_kwargs: list[dict[str, Any]] = field(default_factory=list)
    reference: torch.Tensor | None = None
    target: torch.Tensor | None = None


class _Recorder(nn.Module):
    """Stands in for decoder layer `idx`: records its call, passes hidden states through."""

    def __init__(self, idx: int, original: nn.Module, sink: dict[int, dict], stop: bool):
        super().__init__()
        self.idx, self.sink, self.stop = idx, sink, stop
        for attr in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "use_cache")}
        self.sink[self.idx] = {"hidden": hidden_states, "kwargs": kwargs}
        if self.stop:
            raise _StopForward
        return hidden_states


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class StreamedModel:
    """A causal LM whose weights stay on disk until a module is materialized."""

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: torch.dtype = torch.float32):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        self.dir = Path(model_dir)
        self.config = AutoConfig.from_pretrained(self.dir)
        self.family: Family = family_for(self.config)
        self.store = WeightStore(self.dir)
        self.device = torch.device(device)
        self.dtype = dtype
        with init_empty_weights(include_buffers=False):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.skeleton.eval()
        for mod in self.skeleton.modules():  # real buffers (rotary frequencies) follow the device
            for name, buf in list(mod._buffers.items()):
                if buf is not None and buf.device.type != "meta":
                    mod._buffers[name] = buf.to(self.device)
        self.base = self.skeleton.get_submodule(self.family.layers.rpartition(".")[0])
        self.layers: nn.ModuleList = self.skeleton.get_submodule(self.family.layers)
        self.num_layers = len(self.layers)

    # -- weights ---------------------------------------------------------------------------
    def source_name(self, module_path: str, tensor: str) -> str:
        name = f"{module_path}.{tensor}" if module_path else tensor
        if name not in self.store and name == f"{self.family.lm_head}.weight" and self.tied_embeddings:
            return f"{self.family.embed}.weight"
        return name

    @property
    def tied_embeddings(self) -> bool:
        return bool(getattr(self.config, "tie_word_embeddings", False)) or \
            f"{self.family.lm_head}.weight" not in self.store

    def materialize(self, module_path: str) -> nn.Module:
        """Read the weights of `module_path` from disk onto the device; returns the module."""
        module = self.skeleton.get_submodule(module_path)
        for name, p in list(module.named_parameters()):
            t = self.store.get(self.source_name(module_path, name))
            if tuple(t.shape) != tuple(p.shape):
                raise LowbitError(f"{module_path}.{name} has shape {tuple(t.shape)} in the checkpoint "
                                  f"but {tuple(p.shape)} in the config; the checkpoint does not match its config")
            _set_tensor(module, name, t.to(self.device, self.dtype))
        return module

    def release(self, module_path: str) -> None:
        """Drop the weights of `module_path` (back to the meta device)."""
        module = self.skeleton.get_submodule(module_path)
        for name, p in list(module.named_parameters()):
            _set_tensor(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))

    def layer_path(self, i: int) -> str:
        return f"{self.family.layers}.{i}"

    def linear_names(self, i: int) -> list[str]:
        """Names (relative to the layer) of the nn.Linear modules of layer i."""
        layer = self.layers[i]
        return [n for n, m in layer.named_modules() if isinstance(m, nn.Linear)]

    def weight_shape(self, path: str) -> tuple[int, ...]:
        return self.store.shape(self.source_name(path, "weight"))

    # -- activations -----------------------------------------------------------------------
    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> Batch:
        """Run the model up to decoder layer 0, recording what every layer would be passed.

        Shapes: input_ids [b, seq] -> Batch(hidden [b, seq, hidden]).
        """
        sink: dict[int, dict] = {}
        originals = list(self.layers)
        for i, layer in enumerate(originals):
            self.layers[i] = _Recorder(i, layer, sink, stop=(i == len(originals) - 1))
        # Only the rows of the tokens used are read (a 128k-token fp32 embedding alone is 2 GiB); the
        # embedding module runs on them, with ids renumbered, so family quirks (Gemma's scale) still apply.
        table = self.skeleton.get_submodule(self.family.embed)
        full, padding_idx = table.weight, getattr(table, "padding_idx", None)
        used, local_ids = torch.unique(input_ids, return_inverse=True)
        rows = self.store.rows(self.source_name(self.family.embed, "weight"), used)
        _set_tensor(table, "weight", rows.to(self.device, self.dtype))
        table.padding_idx = None  # only training treats it specially; it may lie outside the rows
        try:
            self.base(input_ids=local_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            table.padding_idx = padding_idx
            _set_tensor(table, "weight", torch.empty(full.shape, dtype=full.dtype, device="meta"))
            for i, layer in enumerate(originals):
                self.layers[i] = layer
        return Batch(hidden=sink[0]["hidden"], layer_kwargs=[sink[i]["kwargs"] for i in range(len(originals))])

    @torch.no_grad()
    def run_layer(self, i: int, batch: Batch) -> torch.Tensor:
        out = self.layers[i](batch.hidden, **batch.layer_kwargs[i])
        return out[0] if isinstance(out, tuple) else out
