"""The tokenizer of a checkpoint as GGUF keys (``tokenizer.ggml.*``), as llama.cpp reads them.

Two kinds, chosen as convert_hf_to_gguf.py does:

  tokenizer.model (SentencePiece)  model "llama": pieces, scores, token types (normal, unknown,
                                   control, user-defined, unused, byte)
  tokenizer.json (byte-level BPE)  model "gpt2": tokens, token types, merges, and the pre-tokenizer
                                   name ("tokenizer.ggml.pre") found by fingerprint (gguf_pretok.py)

Special token ids (bos/eos/unk/pad), add_bos/add_eos and the chat template come from
tokenizer_config.json, tokenizer.json and chat_template.jinja through gguf.SpecialVocab.
A BPE tokenizer whose fingerprint llama.cpp does not know is written with pre "default" and a
warning: it loads, but pre-tokenization (how text is split before merges) may differ.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import gguf

from ..errors import LowbitError
from .gguf_pretok import PRE_TOKENIZERS, PROBE_TEXT

log = logging.getLogger(__name__)

# convert_hf_to_gguf marks these added tokens CONTROL even when not flagged special
_LOOKS_SPECIAL = ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


def _looks_special(tok: str) -> bool:
    return (tok in _LOOKS_SPECIAL or (tok.startswith("<|") and tok.endswith("|>"))
            or (tok.startswith("<｜") and tok.endswith("｜>")) or (tok.startswith("<unused") and tok.endswith(">")))


def pre_tokenizer_name(tokenizer) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a transformers tokenizer (None if unknown)."""
    digest = hashlib.sha256(str(tokenizer.encode(PROBE_TEXT)).encode()).hexdigest()
    return PRE_TOKENIZERS.get(digest)


def bpe_vocab(model_dir: Path, vocab_size: int) -> tuple[list[str], list[int], str]:
    """(tokens [vocab_size], token types, pre-tokenizer name) of a byte-level BPE tokenizer."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    vocab = tok.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise LowbitError(f"the tokenizer in {model_dir} has ids up to {max(vocab.values())} but the model's "
                          f"vocab_size is {vocab_size}; the checkpoint's tokenizer does not match its weights")
    reverse = {i: t for t, i in vocab.items()}
    added = tok.get_added_vocab()
    decoder = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        t = reverse[i]
        if t in added:
            if not decoder[i].normalized:  # llama.cpp expects added tokens pre-normalized
                t = tok.decode(tok.encode(t, add_special_tokens=False))
            if decoder[i].special or _looks_special(t):
                types.append(gguf.TokenType.CONTROL)
            else:
                t = t.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(t)
    pre = pre_tokenizer_name(tok)
    if pre is None:
        log.warning("llama.cpp does not know this tokenizer's pre-tokenizer (fingerprint not in its table); "
                    "writing pre 'default', so llama.cpp may split text differently than transformers")
        pre = "default"
    return tokens, types, pre


def spm_vocab(model_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """(pieces, scores, token types) of a SentencePiece tokenizer.model, padded to vocab_size."""
    try:
        from sentencepiece import SentencePieceProcessor
    except ImportError:
        raise LowbitError("this checkpoint's tokenizer.model needs the sentencepiece package; "
                          "pip install sentencepiece") from None
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    n = sp.vocab_size()
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-1000.0] * vocab_size
    types = [gguf.TokenType.UNUSED] * vocab_size
    for i in range(min(n, vocab_size)):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = (gguf.TokenType.UNKNOWN if sp.IsUnknown(i) else gguf.TokenType.CONTROL if sp.IsControl(i)
                    else gguf.TokenType.UNUSED if sp.IsUnused(i) else gguf.TokenType.BYTE if sp.IsByte(i)
                    else gguf.TokenType.NORMAL)
    cfg = model_dir / "tokenizer_config.json"
    added = json.loads(cfg.read_text()).get("added_tokens_decoder", {}) if cfg.is_file() else {}
    for sid, info in added.items():
        i = int(sid)
        if i >= vocab_size:
            continue
        tokens[i] = info["content"].encode("utf-8")
        scores[i] = -1000.0
        types[i] = gguf.TokenType.CONTROL if info.get("special") else gguf.TokenType.USER_DEFINED
    return tokens, scores, types


def write_vocab(writer, model_dir: Path, arch_name: str, vocab_size: int) -> str:
    """Add the tokenizer keys for the checkpoint in `model_dir`; returns the tokenizer model written."""
    model_dir = Path(model_dir)
    if (model_dir / "tokenizer.model").is_file():
        tokens, scores, types = spm_vocab(model_dir, vocab_size)
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=vocab_size)
        kind = "llama"
    elif (model_dir / "tokenizer.json").is_file():
        tokens, types, pre = bpe_vocab(model_dir, vocab_size)
        model_type = json.loads((model_dir / "tokenizer.json").read_text()).get("model", {}).get("type")
        if model_type != "BPE":
            raise LowbitError(f"{model_dir}/tokenizer.json holds a {model_type} tokenizer; GGUF export writes "
                              "byte-level BPE from tokenizer.json or SentencePiece from tokenizer.model")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=vocab_size)
        kind = "gpt2"
    else:
        raise LowbitError(f"{model_dir} has no tokenizer.json or tokenizer.model; a GGUF needs the tokenizer, "
                          "so copy it from the original checkpoint")
    cfg = model_dir / "tokenizer_config.json"
    tok_cfg = json.loads(cfg.read_text()) if cfg.is_file() else {}
    if arch_name == "llama" and tok_cfg.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(tok_cfg["add_prefix_space"])
    if arch_name in ("gemma2", "gemma3") and kind == "llama":
        writer.add_add_space_prefix(False)
    if arch_name == "llama" and vocab_size == 49152:  # StarCoder-style vocabularies (SmolLM): no BOS
        special.add_special_token["bos"] = False
    special.add_to_gguf(writer, quiet=True)
    return kind
