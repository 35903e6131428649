"""Shared fixtures: tiny random models of every supported family, built in-test (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import settings

FAMILY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {}),
    "gemma2": ("Gemma2Config", {"query_pre_attn_scalar": 16, "sliding_window": 4096}),
    "gemma3_text": ("Gemma3TextConfig", {"query_pre_attn_scalar": 16, "sliding_window": 4096}),
    "phi3": ("Phi3Config", {"pad_token_id": 0}),
}
ALL_FAMILIES = sorted(FAMILY_CONFIGS)

# Property tests explore freely on a developer's machine; CI replays a fixed sequence so that a
# red run is reproducible and never a matter of luck.
settings.register_profile("dev", max_examples=40, deadline=None)
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None)
settings.load_profile("ci" if os.environ.get("CI") else "dev")
VOCAB = 384


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path_factory.getbasetemp() / "lowbit-cache"))
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer trained in a second on the embedded calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lowbit.data import load_text

    text = load_text("default").text[:200_000]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    d = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(d)
    return d


def make_tiny_config(family: str, **overrides):
    import transformers
    cls_name, extra = FAMILY_CONFIGS[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    kw.update(extra)
    kw.update(overrides)
    if family == "phi3":
        kw.pop("head_dim")
    return getattr(transformers, cls_name)(**kw)


def build_tiny_model(family: str, out_dir: Path, tokenizer_dir: Path, dtype=torch.float32, **overrides) -> Path:
    """Save a random tiny model of `family` with the test tokenizer; returns its directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(make_tiny_config(family, **overrides), dtype=dtype)
    with torch.no_grad():  # non-trivial norms, so folding mistakes show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: build_tiny_model(f, root / f, tiny_tokenizer_dir) for f in ALL_FAMILIES}


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> str:
    """A slice of the default calibration text: tokenizing all of it would dominate tiny-model runs."""
    from lowbit.data import load_text
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(load_text("default").text[:20_000])
    return str(p)


@pytest.fixture
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


def smollm2_dir() -> Path | None:
    """The real SmolLM2 checkpoint if it has been fetched (CI fetches it first)."""
    root = Path(os.environ.get("LOWBIT_REAL_CACHE", Path.home() / ".cache" / "lowbit"))
    d = root / "models" / "smollm2-135m"
    return d if (d / "config.json").is_file() else None
