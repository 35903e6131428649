"""The HTML/Markdown report: pure pieces, and the real page rendered in headless Chromium."""
from __future__ import annotations

import base64
import json
import re
import subprocess
from pathlib import Path

import pytest

import lowbit
from lowbit.cli import main
from lowbit.eval.report import Candidate, layer_errors, load_candidates, pareto_front, render_html

CHROMIUM = Path("/usr/bin/chromium")
QUICK = dict(n_calib=4, seq_len=32, progress=False)
PNG = b"\x89PNG\r\n\x1a\n"


def test_pareto_front():
    pts = [(1.0, 0.5), (2.0, 0.1), (3.0, 0.2), (0.5, 1.0), (2.0, 0.3)]
    assert pareto_front(pts) == [3, 0, 1]
    assert pareto_front([(1.0, 0.1), (1.0, 0.1)]) == [0]
    assert pareto_front([]) == []


def test_layer_errors_average_changed_tensors_per_layer():
    rows = [{"name": "model.layers.0.mlp.up_proj.weight", "rel_rms": 0.1},
            {"name": "model.layers.0.mlp.down_proj.weight", "rel_rms": 0.3},
            {"name": "model.layers.0.input_layernorm.weight", "rel_rms": 0.0},
            {"name": "model.layers.1.self_attn.q_proj.weight", "rel_rms": 0.5},
            {"name": "model.embed_tokens.weight", "rel_rms": 0.9}]
    assert layer_errors(rows) == pytest.approx({0: 0.2, 1: 0.5})


def test_html_escapes_names_and_embeds_only_data_images():
    c = Candidate("w4<img src=x onerror=alert(1)>", {"kld_mean": 0.01, "top1": 0.9, "ppl": 10.0, "ppl_base": 9.9},
                  2**20)
    page = render_html("t", {}, [c], {"pareto": PNG + b"x"}, "now")
    assert "<img src=x" not in page and "w4&lt;img src=x onerror=alert(1)&gt;" in page
    assert re.findall(r"src='([^']*)'", page) == ["data:image/png;base64," + base64.b64encode(PNG + b"x").decode()]


@pytest.fixture(scope="module")
def report_inputs(tiny_models, tmp_path_factory) -> dict:
    """An eval JSON over two real candidates of the tiny llama, and an inspect JSON for one."""
    src = tiny_models["llama"]
    root = tmp_path_factory.mktemp("report")
    c4 = lowbit.quantize(src, root / "rtn-w4", bits=4, group_size=32, **QUICK)
    c2 = lowbit.quantize(src, root / "rtn-w2", bits=2, group_size=32, **QUICK)
    from lowbit.eval.compare import evaluate_many, results_json
    res = evaluate_many([str(c4), str(c2)], str(src), ctx=32, n_windows=4, progress=False, n_bootstrap=100,
                        cache_root=root / "cache")
    ev = root / "eval.json"
    ev.write_text(json.dumps(results_json(res)))
    from lowbit.eval.inspect import inspect_checkpoint
    ins = root / "inspect-w2.json"
    ins.write_text(json.dumps({"model": str(c2), "tensors": [e.to_json() for e in inspect_checkpoint(str(c2))]}))
    return {"eval": ev, "inspect": ins, "root": root}


def test_candidates_pick_up_lowbit_json_and_inspect(report_inputs):
    _, cands = load_candidates([report_inputs["eval"]], [report_inputs["inspect"]])
    assert [c.name for c in cands] == ["rtn-w4", "rtn-w2"]
    assert all(c.timings and c.timings["total_s"] > 0 and c.recipe["method"] == "rtn" for c in cands)
    assert cands[0].tensors is None and len(cands[1].tensors) > 14
    assert cands[1].size_bytes < cands[0].size_bytes


def test_report_files_are_self_contained(report_inputs, tmp_path, capsys):
    out = tmp_path / "rep" / "report"
    assert main(["-q", "report", str(report_inputs["eval"]), "--inspect", str(report_inputs["inspect"]),
                 "--out", str(out)]) == 0
    html_path, md_path = Path(str(out) + ".html"), Path(str(out) + ".md")
    assert capsys.readouterr().out.split() == [str(html_path), str(md_path)]
    page = html_path.read_text()
    srcs = re.findall(r"<img [^>]*src='([^']*)'", page)
    assert len(srcs) == 3  # Pareto, histograms, per-layer
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG)
    assert not re.search(r"(src|href)=['\"]?(https?:|//|file:)", page)
    md = md_path.read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) == 3 and all((md_path.parent / link).read_bytes().startswith(PNG) for link in links)
    assert "| rtn-w4 |" in md and "Timings" in md


def test_report_renders_in_headless_chromium(report_inputs, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is not installed (apt-get install -y chromium)")
    from lowbit.eval.report import write_report
    html_path, _ = write_report(tmp_path / "r", [report_inputs["eval"]], [report_inputs["inspect"]])
    probe = ("<script>window.addEventListener('load',function(){var r=[];"
             "document.querySelectorAll('img').forEach(function(i){"
             "r.push(i.id+'='+i.naturalWidth+'x'+i.naturalHeight)});"
             "var p=document.createElement('pre');p.id='img-check';p.textContent=r.join(';');"
             "document.body.appendChild(p);});</script>")
    checked = tmp_path / "checked.html"
    checked.write_text(html_path.read_text().replace("</body>", probe + "</body>"))
    flags = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=5000"]
    dom = subprocess.run(flags + ["--dump-dom", checked.as_uri()], capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="img-check">([^<]*)</pre>', dom)
    assert m, f"the probe did not run; chromium printed: {dom[:500]}"
    sizes = dict(item.split("=") for item in m.group(1).split(";"))
    assert set(sizes) == {"fig-pareto", "fig-kld_hist", "fig-layers"}
    for fig, wh in sizes.items():
        w, h = map(int, wh.split("x"))
        assert w > 0 and h > 0, f"{fig} did not decode"
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,2400", html_path.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.read_bytes().startswith(PNG) and shot.stat().st_size > 10_000
