"""Calibration and evaluation text."""
from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from transformers import AutoTokenizer

from lowbit.data import calibration_ids, eval_windows, load_text
from lowbit.errors import LowbitError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_embedded_texts_are_distinct_and_substantial():
    calib, ev = load_text("default"), load_text("moby-dick")
    assert len(calib.text) > 500_000 and len(ev.text) > 300_000
    assert calib.sha256 != ev.sha256
    assert "Call me Ishmael" in ev.text and "Ishmael" not in calib.text


def test_calibration_is_deterministic_for_a_seed(tok):
    src = load_text("default")
    a = calibration_ids(tok, src, 8, 64, seed=3)
    b = calibration_ids(tok, src, 8, 64, seed=3)
    c = calibration_ids(tok, src, 8, 64, seed=4)
    assert a.shape == (8, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_local_txt_and_jsonl(tok, tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 200)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(300)))
    assert calibration_ids(tok, load_text(str(tmp_path / "a.txt")), 2, 16, 0).shape == (2, 16)
    assert "line 7 of text" in load_text(str(tmp_path / "b.jsonl")).text
    (tmp_path / "bad.jsonl").write_text('{"nope": 1}\n')
    with pytest.raises(LowbitError, match="bad.jsonl:1"):
        load_text(str(tmp_path / "bad.jsonl"))


def test_too_short_text_is_refused(tok, tmp_path):
    (tmp_path / "s.txt").write_text("tiny")
    with pytest.raises(LowbitError, match="fewer than --seq-len"):
        calibration_ids(tok, load_text(str(tmp_path / "s.txt")), 2, 512, 0)


def test_eval_windows_do_not_overlap(tok):
    w = eval_windows(tok, load_text("moby-dick"), 128, 5)
    ids = tok(load_text("moby-dick").text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(w.reshape(-1), ids[: 5 * 128])


@pytest.mark.parametrize("name,split,hub_split", [("wikitext2", "calibration", "train"),
                                                  ("wikitext2-simple", "evaluation", "test"),
                                                  ("c4", "calibration", "train")])
def test_hub_dataset_names_go_through_datasets(name, split, hub_split, monkeypatch):
    seen = {}

    def load_dataset(path, config=None, split=None, **kw):
        seen.update(path=path, config=config, split=split, **kw)
        return {"text": [" = Heading = \n", "", "A paragraph of text.\n", "Another one.\n"]}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    src = load_text(name, split=split)
    assert seen["split"] == hub_split and "A paragraph of text." in src.text
    assert ("Heading" in src.text) == (name != "wikitext2-simple")
