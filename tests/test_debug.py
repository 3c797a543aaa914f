"""The debugger: metrics vs numpy, aligned capture, the mismatch lab, figures, widget, renderer, memory."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import nbtrt
from nbtrt._io import ArtifactError
from nbtrt.convert import convert_tensors
from nbtrt.debug import bisect, compare, lab, metrics
from nbtrt.debug.capture import KINDS, probes
from nbtrt.mapping import ARCHITECTURES, architecture_for
from nbtrt.model import capture_outputs, decoder_from_tensors
from nbtrt.testing import TINY, random_hf_model, tiny_hf_model

ROOT = Path(__file__).resolve().parents[1]
ARCHS = sorted(TINY)
IDS = torch.randint(0, 257, (1, 24), generator=torch.Generator().manual_seed(3)).tolist()


@pytest.fixture(scope="module")
def models():
    """arch -> (HF model, nbtrt config, converted tensors), all in memory, built once."""
    out = {}
    for arch in ARCHS:
        hf = random_hf_model(arch)
        a = architecture_for(hf.config.to_dict())
        cfg = a.config_from_hf(hf.config.to_dict(), "float32")
        out[arch] = (hf, cfg, convert_tensors(a, cfg, hf.state_dict()))
    return out


# ------------------------------------------------------------------------------ metrics vs numpy
def _np_log_softmax(x):
    x = x.astype(np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def test_tensor_and_token_metrics_match_numpy():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(2, 7, 33, generator=g)
    cand = ref + 0.05 * torch.randn(2, 7, 33, generator=g)
    r, c = ref.numpy().astype(np.float64), cand.numpy().astype(np.float64)
    d = c - r
    m = metrics.tensor_metrics(ref, cand)
    assert m["max_abs"] == pytest.approx(np.abs(d).max(), rel=1e-12)
    assert m["mean_abs"] == pytest.approx(np.abs(d).mean(), rel=1e-12)
    assert m["rel_l2"] == pytest.approx(np.linalg.norm(d) / np.linalg.norm(r), rel=1e-12)
    cos = (r * c).sum() / (np.linalg.norm(r) * np.linalg.norm(c))
    assert m["cosine"] == pytest.approx(cos, rel=1e-12)
    assert m["one_minus_cosine"] == pytest.approx(1 - cos, rel=1e-6)

    t = metrics.token_metrics(ref, cand)
    assert t["rel_l2"].shape == (2, 7)
    np.testing.assert_allclose(t["max_abs"], np.abs(d).max(-1), rtol=1e-12)
    np.testing.assert_allclose(t["mean_abs"], np.abs(d).mean(-1), rtol=1e-12)
    np.testing.assert_allclose(t["rel_l2"], np.linalg.norm(d, axis=-1) / np.linalg.norm(r, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(t["cosine"], (r * c).sum(-1) / (np.linalg.norm(r, axis=-1) * np.linalg.norm(c, axis=-1)),
                               rtol=1e-12)

    s = metrics.summary(ref)
    assert s["shape"] == (2, 7, 33)
    assert s["sum"] == pytest.approx(r.sum(), rel=1e-12, abs=1e-9)
    assert s["mean"] == pytest.approx(r.mean(), rel=1e-12, abs=1e-12)

    edges, counts = metrics.diff_histogram(ref, cand)
    np_counts, np_edges = np.histogram(d, bins=metrics.HIST_BINS, range=(-np.abs(d).max(), np.abs(d).max()))
    np.testing.assert_allclose(edges, np_edges, rtol=1e-12)
    np.testing.assert_array_equal(counts, np_counts)
    assert counts.sum() == d.size


def test_metrics_edge_cases():
    z = torch.zeros(1, 3, 4)
    same = metrics.tensor_metrics(z, z)
    assert same["rel_l2"] == 0.0 and same["cosine"] == 1.0 and same["max_abs"] == 0.0
    assert math.isinf(metrics.tensor_metrics(z, z + 1)["rel_l2"])
    with pytest.raises(ValueError, match="shapes"):
        metrics.tensor_metrics(z, torch.zeros(1, 3, 5))
    # chunking must not change results: a tensor several chunks long
    big = torch.randn(1, 3000, 1500, generator=torch.Generator().manual_seed(1))
    other = big * 1.001 + 1e-3
    b, o = big.numpy().astype(np.float64), other.numpy().astype(np.float64)
    m = metrics.tensor_metrics(big, other)
    assert m["rel_l2"] == pytest.approx(np.linalg.norm(o - b) / np.linalg.norm(b), rel=1e-9)
    assert m["max_abs"] == pytest.approx(np.abs(o - b).max(), rel=1e-12)
    with pytest.raises(ValueError, match="unknown precision"):
        metrics.precision_name("fp12")
    assert metrics.coarsest("fp32", "bf16", "fp16") == "bfloat16"


def test_logits_metrics_match_numpy():
    g = torch.Generator().manual_seed(2)
    ref = 3 * torch.randn(2, 9, 50, generator=g)
    cand = ref + 0.7 * torch.randn(2, 9, 50, generator=g)
    r, c = ref.numpy(), cand.numpy()
    k = 5
    m = metrics.logits_metrics(ref, cand, k=k)
    match = r.argmax(-1) == c.argmax(-1)
    assert 0 < match.mean() < 1, "the test needs some disagreement"
    np.testing.assert_array_equal(m["argmax_match"], match)
    assert m["argmax_agreement"] == pytest.approx(match.mean())
    tr, tc = np.argsort(-r, -1)[..., :k], np.argsort(-c, -1)[..., :k]
    overlap = np.array([[len(set(tr[b, t]) & set(tc[b, t])) / k for t in range(9)] for b in range(2)])
    np.testing.assert_allclose(m["topk_overlap_tokens"], overlap)
    assert m["topk_overlap"] == pytest.approx(overlap.mean())
    lr, lc = _np_log_softmax(r), _np_log_softmax(c)
    kl = (np.exp(lr) * (lr - lc)).sum(-1)
    np.testing.assert_allclose(m["kl_tokens"], kl, rtol=1e-9)
    assert m["kl"] == pytest.approx(kl.mean(), rel=1e-9)
    rows = metrics.topk_side_by_side(ref[1, 4], cand[1, 4], k=k)
    assert {row["token_id"] for row in rows} == set(tr[1, 4]) | set(tc[1, 4])
    for row in rows:
        assert row["ref_prob"] == pytest.approx(np.exp(lr[1, 4, row["token_id"]]), rel=1e-9)
        assert row["cand_prob"] == pytest.approx(np.exp(lc[1, 4, row["token_id"]]), rel=1e-9)


# ------------------------------------------------------------------------------ alignment and capture
def test_probes_follow_the_mapping_tables(models):
    _, cfg, _ = models["LlamaForCausalLM"]
    ps = probes(ARCHITECTURES["LlamaForCausalLM"], cfg, layers=[1], kinds=KINDS)
    assert [p.name for p in ps] == ["embed", "layers.1.attn_norm", "layers.1.attn.q", "layers.1.attn.k",
                                    "layers.1.attn.v", "layers.1.attn", "layers.1.mlp", "layers.1",
                                    "final_norm", "lm_head"]
    q = ps[2]
    assert (q.module, q.hf_module, q.part, q.hf_part) == ("layers.1.attn.qkv", "model.layers.1.self_attn.q_proj",
                                                        (0, cfg.q_size), None)
    _, gcfg, _ = models["GPT2LMHeadModel"]
    k = [p for p in probes(ARCHITECTURES["GPT2LMHeadModel"], gcfg, kinds=["k"])][0]
    assert k.hf_module == "transformer.h.0.attn.c_attn" and k.hf_part == k.part == (gcfg.q_size, 2 * gcfg.q_size)
    with pytest.raises(ValueError, match="out of range"):
        probes(ARCHITECTURES["LlamaForCausalLM"], cfg, layers=[7])
    with pytest.raises(KeyError, match="unknown tensor names"):
        probes(ARCHITECTURES["LlamaForCausalLM"], cfg, names=["layers.0.attention"])


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "GPT2LMHeadModel"])
def test_clean_conversion_has_no_divergence_on_every_kind(models, arch):
    hf, cfg, tensors = models[arch]
    r = compare(hf, decoder_from_tensors(cfg, tensors), input_ids=IDS, kinds=KINDS, threshold="fp32")
    assert r.first_divergence is None, r.summary()
    assert len(r.tensors) == 2 + cfg.num_layers * 7 + 1
    assert r.logits["argmax_agreement"] == 1.0


def test_subset_of_layers_kinds_and_positions(models):
    hf, cfg, tensors = models["LlamaForCausalLM"]
    bugged = lab.inject((cfg, tensors), "rope_applied_twice")
    r = compare(hf, bugged, input_ids=IDS, layers=[-1], kinds=["attn", "block"], positions=[0, -1])
    assert [t.name for t in r.tensors] == [f"layers.{cfg.num_layers - 1}.attn", f"layers.{cfg.num_layers - 1}"]
    assert r.positions == [0, 23] and r.tensors[0].shape == (1, 2, cfg.hidden_size)
    # RoPE does nothing at position 0: rotating twice by angle 0 is still no rotation
    rel = r.tensors[0].tokens["rel_l2"][0]
    assert rel[1] > 1e-3 and rel[0] < rel[1] * 1e-2
    assert r.logits["argmax_match"].shape == (1, 2)
    named = compare(hf, bugged, input_ids=IDS, names=["layers.0.attn_norm", "lm_head"])
    assert [t.name for t in named.tensors] == ["layers.0.attn_norm", "lm_head"]


def test_captured_tensors_equal_hf_hidden_states(models):
    """The residual stream the debugger measures is HF's own output_hidden_states."""
    hf, cfg, tensors = models["MistralForCausalLM"]
    bugged = lab.inject((cfg, tensors), "rms_eps_wrong")
    r = compare(hf, bugged, input_ids=IDS, kinds=["block"])
    ids = torch.tensor(IDS)
    with torch.no_grad():
        theirs = hf(ids, output_hidden_states=True).hidden_states
        with capture_outputs(bugged, [f"layers.{i}" for i in range(cfg.num_layers)]) as ours:
            bugged(ids)
    for i in range(cfg.num_layers - 1):  # HF's last hidden state already has the final norm applied
        a, b = theirs[i + 1].double().numpy(), ours[f"layers.{i}"].double().numpy()
        assert r[f"layers.{i}"].error() == pytest.approx(np.linalg.norm(b - a) / np.linalg.norm(a), rel=1e-9)


def test_candidates_of_every_kind_agree(tmp_path):
    """HF dir vs checkpoint dir, Engine, engine dir and HF model: same numbers, no divergence."""
    src = tiny_hf_model("Qwen3ForCausalLM", tmp_path / "hf")
    ckpt = nbtrt.convert(src, tmp_path / "ckpt")
    edir = nbtrt.build(ckpt, tmp_path / "engine", backend="torch", max_batch_size=2, max_input_len=32, max_seq_len=64)
    reports = {
        "checkpoint": compare(src, ckpt, input_ids=IDS),
        "engine": compare(src, nbtrt.load(edir, device="cpu"), input_ids=IDS),
        "engine dir": compare(src, edir, input_ids=IDS),
        "hf": compare(src, src, input_ids=IDS),
    }
    for name, r in reports.items():
        assert r.first_divergence is None, (name, r.summary())
        assert r.logits["argmax_agreement"] == 1.0
        assert [t.name for t in r.tensors] == [t.name for t in reports["checkpoint"].tensors]
    assert reports["engine"].candidate == "torch engine"
    with pytest.raises(ValueError, match="pass input_ids"):
        compare(src, ckpt, "no tokenizer here")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        compare(src, ckpt, input_ids=[[0, 999]])


def test_a_bug_found_through_an_onnxruntime_engine(tmp_path):
    """A buggy converter's checkpoint, built into an ONNX Runtime engine: the engine's extra graph
    outputs (q/k/v sliced out of GPT-2's fused projection included) name the first bad tensor."""
    src = tiny_hf_model("GPT2LMHeadModel", tmp_path / "hf")
    ckpt = nbtrt.convert(src, tmp_path / "ckpt")
    bad = lab.save(ckpt, "conv1d_not_transposed", tmp_path / "bad")
    opts = dict(backend="onnxruntime", max_batch_size=1, max_input_len=32, max_seq_len=32)
    good = compare(src, nbtrt.load(nbtrt.build(ckpt, tmp_path / "good-engine", **opts)), input_ids=IDS, kinds=KINDS)
    assert good.first_divergence is None, good.summary()
    r = compare(src, nbtrt.load(nbtrt.build(bad, tmp_path / "bad-engine", **opts)), input_ids=IDS, kinds=KINDS)
    assert r.first_divergence is not None and r.first_divergence.name == "layers.0.attn.q", r.summary()
    with pytest.raises(ValueError, match="runtime"):
        lab.save(ckpt, "rope_applied_twice", tmp_path / "x")
    for out in (ckpt, Path(ckpt) / "inside"):  # a buggy copy never replaces (or nests in) its source
        with pytest.raises(ArtifactError, match="overlaps the input"):
            lab.save(ckpt, "conv1d_not_transposed", out, overwrite=True)
    assert nbtrt.load(nbtrt.build(ckpt, tmp_path / "still-good", **opts)) is not None


def test_different_models_are_refused(models):
    hf, _, _ = models["LlamaForCausalLM"]
    _, cfg, tensors = models["MistralForCausalLM"]
    with pytest.raises(ValueError, match="different models"):
        compare(hf, decoder_from_tensors(cfg, tensors), input_ids=IDS)


def test_threshold_by_precision(models):
    hf, cfg, tensors = models["Qwen2ForCausalLM"]
    half = decoder_from_tensors(cfg, tensors, dtype="bfloat16")
    r = compare(hf, half, input_ids=IDS)
    assert r.precision == "bfloat16" and r.threshold == metrics.PRECISION_TOLERANCE["bfloat16"]
    assert r.first_divergence is None, r.summary()
    strict = r.divergence(metrics.PRECISION_TOLERANCE["float32"])
    assert strict is not None and strict.name == "embed"  # bf16 rounding shows at the first tensor
    # two precisions, two tolerance lines, told apart by their style (not only by hover)
    exact = compare(hf, decoder_from_tensors(cfg, tensors), input_ids=IDS)
    fig = nbtrt.debug.error_vs_layer({"float32": exact, "bfloat16": r}, kind="block")
    tolerances = [t for t in fig.data if t.name.startswith("threshold")]
    assert len(tolerances) == 2 and tolerances[0].line.dash != tolerances[1].line.dash
    assert compare(hf, half, input_ids=IDS, threshold=0.5, metric="max_abs").metric == "max_abs"
    with pytest.raises(ValueError, match="pass a number"):
        compare(hf, half, input_ids=IDS, threshold="fp16", metric="max_abs")


# ------------------------------------------------------------------------------ the mismatch lab
LAB_CASES = [(b, a) for b in sorted(lab.BUGS) for a in ARCHS
             if lab.BUGS[b].applies(architecture_for({"architectures": [a]}).config_from_hf(
                 dict(TINY[a], architectures=[a]), "float32"))]


def test_every_bug_is_tested_on_enough_architectures():
    per_bug = {b: [a for bb, a in LAB_CASES if bb == b] for b in lab.BUGS}
    for bug, archs in per_bug.items():
        assert len(archs) >= (1 if bug == "conv1d_not_transposed" else 2), (bug, archs)
    assert per_bug["conv1d_not_transposed"] == ["GPT2LMHeadModel"]


@pytest.mark.parametrize("bug,arch", LAB_CASES)
def test_lab_names_the_first_tensor_the_bug_touches(models, bug, arch):
    hf, cfg, tensors = models[arch]
    report = lab.run(hf, (cfg, tensors), bug, input_ids=IDS)
    d = report.first_divergence
    assert d is not None and d.name == lab.BUGS[bug].first_tensor(), report.summary()
    # finer capture (q/k/v split out of the fused projection) moves the answer where it should
    fine = lab.run(hf, (cfg, tensors), bug, input_ids=IDS, kinds=KINDS)
    assert fine.first_divergence.name == lab.BUGS[bug].first_tensor([t.name for t in fine.tensors])
    # and bisection, running only what it needs, agrees
    b = bisect(hf, lab.inject((cfg, tensors), bug), input_ids=IDS)
    assert b.first_divergence is not None and b.first_divergence.name == d.name
    # its table and figure show every probe it made, the last one over the threshold
    rows = b.table()
    assert len(rows) == len(b.steps) and rows[-1]["over threshold"] and d.name in rows[-1]["tensors"]
    assert d.name in b._repr_html_() and "<table>" in b._repr_html_()
    fig = b.figure()
    assert list(fig.data[0].customdata) == [r[b.metric] for r in rows]
    assert fig.data[1].name == "threshold" and fig.data[1].y[0] == b.threshold


@pytest.mark.parametrize("arch", ARCHS)
def test_lab_unbugged_model_reports_no_divergence(models, arch):
    hf, cfg, tensors = models[arch]
    table = lab.check(hf, (cfg, tensors), input_ids=IDS, threshold="fp32")
    assert table.rows[0]["bug"] == "(none)" and table.rows[0]["ok"], table.rows[0]
    assert all(row["ok"] for row in table.rows), table.rows
    assert bisect(hf, decoder_from_tensors(cfg, tensors), input_ids=IDS).first_divergence is None


def test_lab_refuses_a_bug_that_cannot_occur(models):
    _, cfg, tensors = models["LlamaForCausalLM"]
    with pytest.raises(ValueError, match="conv1d_not_transposed.*cannot occur"):
        lab.inject((cfg, tensors), "conv1d_not_transposed")
    with pytest.raises(KeyError, match="unknown bug"):
        lab.inject((cfg, tensors), "rope_applied_thrice")


def test_lab_leaves_the_model_alone(models, tmp_path):
    hf, cfg, tensors = models["Qwen2ForCausalLM"]
    before = {k: v.clone() for k, v in tensors.items()}
    for bug in lab.applicable(cfg):
        lab.inject((cfg, tensors), bug)
    assert all(torch.equal(before[k], tensors[k]) for k in before)
    clean = decoder_from_tensors(cfg, tensors)
    lab.inject(clean, "rope_applied_twice")  # hooks go on the new instance only
    assert not clean.rope._forward_hooks
    assert compare(hf, clean, input_ids=IDS).first_divergence is None


# ------------------------------------------------------------------------------ figures
@pytest.fixture(scope="module")
def bug_reports(models):
    hf, cfg, tensors = models["LlamaForCausalLM"]
    return {
        "clean": compare(hf, decoder_from_tensors(cfg, tensors), input_ids=IDS, label="clean"),
        "eps": lab.run(hf, (cfg, tensors), "rms_eps_wrong", input_ids=IDS),
        "gate": lab.run(hf, (cfg, tensors), "gate_up_swapped", input_ids=IDS),
    }


def test_figures_carry_the_computed_values(models, bug_reports):
    hf, cfg, tensors = models["LlamaForCausalLM"]
    r = bug_reports["eps"]
    bugged = lab.inject((cfg, tensors), "rms_eps_wrong")
    ids = torch.tensor(IDS)
    names = [f"layers.{i}" for i in range(cfg.num_layers)]
    with torch.no_grad():
        theirs = hf(ids, output_hidden_states=True).hidden_states
        with capture_outputs(bugged, names) as ours:
            logits = bugged(ids)
        ref_logits = hf(ids).logits
    a = [theirs[i + 1][0].double().numpy() for i in range(cfg.num_layers - 1)]
    b = [ours[n][0].double().numpy() for n in names[:-1]]

    fig = r.figure(kind="block")
    line = next(t for t in fig.data if t.name == r.label)
    assert list(line.x) == list(range(cfg.num_layers))
    expected = [np.linalg.norm(y - x) / np.linalg.norm(x) for x, y in zip(a, b)]
    np.testing.assert_allclose(line.customdata[:-1], expected, rtol=1e-9)
    assert list(next(t for t in fig.data if t.name == "threshold").y) == [1e-4, 1e-4]
    assert fig.layout.yaxis.type == "log"

    everything = nbtrt.debug.error_vs_layer(bug_reports)  # one line per comparison
    assert [t.name for t in everything.data if t.mode == "lines+markers"] == ["clean", "eps", "gate"]
    marks = [t for t in everything.data if t.name.endswith("first divergence")]
    assert [t.x[0] for t in marks] == ["layers.0.attn_norm", "layers.0.mlp"]

    heat = r.heatmap(kind="block")
    per_token = [np.linalg.norm(y - x, axis=-1) / np.linalg.norm(x, axis=-1) for x, y in zip(a, b)]
    np.testing.assert_allclose(np.asarray(heat.data[0].customdata)[:-1], per_token, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(heat.data[0].z)[:-1], np.log10(per_token), rtol=1e-9)

    hist = r.histogram("layers.0")
    diff = (b[0] - a[0]).ravel()
    span = np.abs(diff).max()
    counts, edges = np.histogram(diff, bins=metrics.HIST_BINS, range=(-span, span))
    np.testing.assert_array_equal(np.asarray(hist.data[0].y), counts)
    np.testing.assert_allclose(np.asarray(hist.data[0].x), (edges[:-1] + edges[1:]) / 2, rtol=1e-9, atol=1e-15)

    table = r.topk_table(position=7)
    cells = table.data[0].cells.values
    p_ref = np.exp(_np_log_softmax(ref_logits[0, 7].numpy()))
    p_cand = np.exp(_np_log_softmax(logits[0, 7].numpy()))
    ids_shown = list(cells[1])
    assert set(np.argsort(-p_ref)[:5]) <= set(ids_shown)
    np.testing.assert_allclose(cells[2], p_ref[ids_shown], rtol=1e-9)
    np.testing.assert_allclose(cells[3], p_cand[ids_shown], rtol=1e-9)


def test_report_table_and_summary(bug_reports):
    r = bug_reports["gate"]
    rows = r.table()
    assert [row["tensor"] for row in rows if row["diverged"]][0] == "layers.0.mlp"
    assert rows[0]["tensor"] == "embed" and rows[0]["ref_sum"] == pytest.approx(rows[0]["cand_sum"])
    assert "first divergence at layers.0.mlp" in r.summary()
    assert "layers.0.mlp" in r._repr_html_()


# ------------------------------------------------------------------------------ widget
def test_diff_explorer_updates_in_place(bug_reports):
    from nbtrt.widgets import DiffExplorer

    ex = DiffExplorer(bug_reports)
    assert ex.figure.data[0].type == "scatter" and "no tensor over" in ex.status.value
    ex.comparison.value = "gate"
    assert "layers.0.mlp" in ex.status.value
    first = ex.figure
    ex.kind.value = "mlp"
    assert ex.figure is not first and list(ex.figure.data[0].x) == [0, 1, 2]
    ex.threshold.value = 10.0
    assert "no tensor over" in ex.status.value
    ex.view.value = "layer × token"
    ex.kind.value = "block"
    ex.layer.value = 2
    assert ex.figure.data[0].type == "heatmap" and list(ex.figure.data[1].y) == [2]
    ex.view.value = "histogram"
    assert ex.figure.data[0].name == "layers.2"
    ex.view.value = "top-k tokens"
    ex.token.value = 3
    assert "position 3" in ex.figure.layout.title.text


# ------------------------------------------------------------------------------ renderer
NOTEBOOK_CELLS = [
    "from nbtrt import plots\nplots.setup_renderer()",
    "plots.error_lines({'probe': ([0, 1, 2], [1e-3, 2e-2, 31415.9265])})",
]


def _executed_notebook(tmp_path):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in NOTEBOOK_CELLS])
    NotebookClient(nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    return nb


def test_figures_survive_execution_and_html_export(tmp_path):
    from nbconvert import HTMLExporter

    nb = _executed_notebook(tmp_path)
    outputs = [o for o in nb.cells[1].outputs if o.output_type in ("display_data", "execute_result")]
    figure = [o for o in outputs if "application/vnd.plotly.v1+json" in o.data]
    assert figure and "text/html" in figure[0].data, [list(o.data) for o in outputs]
    assert "31415.9265" in figure[0].data["text/html"]
    body, _ = HTMLExporter().from_notebook_node(nb)
    assert "Plotly.newPlot" in body and "31415.9265" in body
    # plotly.js itself travels with the notebook, so the export draws offline
    assert len(body) > 3_000_000


@pytest.mark.browser
def test_exported_html_draws_the_figure_offline(tmp_path):
    from nbconvert import HTMLExporter

    browser = pytest.importorskip("browser.lab")
    body, _ = HTMLExporter().from_notebook_node(_executed_notebook(tmp_path))
    page_file = tmp_path / "export.html"
    page_file.write_text(body)
    with browser.browser_page() as page:
        page.route("**/*", lambda route: route.abort() if not route.request.url.startswith("file:") else route.continue_())
        page.goto(page_file.as_uri())
        page.wait_for_selector(".js-plotly-plot .scatterlayer .trace", timeout=60_000)
        assert page.locator(".js-plotly-plot").count() == 1


EXPLORER_CELLS = [
    "from nbtrt import debug, plots\nfrom nbtrt.convert import convert_tensors\nfrom nbtrt.mapping import architecture_for\n"
    "from nbtrt.testing import random_hf_model\nfrom nbtrt.widgets import DiffExplorer\nplots.setup_renderer()",
    "hf = random_hf_model('Qwen2ForCausalLM')\narch = architecture_for(hf.config.to_dict())\n"
    "cfg = arch.config_from_hf(hf.config.to_dict(), 'float32')\nmodel = (cfg, convert_tensors(arch, cfg, hf.state_dict()))\n"
    "DiffExplorer({'gate/up': debug.lab.run(hf, model, 'gate_up_swapped', input_ids=[[1, 2, 3, 4, 5, 6]])})",
]


@pytest.mark.browser
def test_diff_explorer_redraws_in_jupyterlab(tmp_path):
    """In a real JupyterLab: the explorer draws its figure, and a click redraws it in place."""
    import nbformat

    browser = pytest.importorskip("browser.lab")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in EXPLORER_CELLS], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    nbformat.write(nb, tmp_path / "explorer.ipynb")
    figures = ("() => [...document.querySelectorAll('.widget-output .js-plotly-plot')]"
               ".map(g => (g.data || []).map(t => t.type).join(','))")
    with browser.jupyter_lab(tmp_path, tmp_path / "lab.log") as (url, token), browser.browser_page() as page:
        browser.open_notebook(page, url, token, "explorer.ipynb")
        browser.run_all(page)
        browser.wait_until_done(page, 300)
        assert browser.cell_errors(page) == []
        page.wait_for_selector(".widget-output .js-plotly-plot .scatterlayer .trace", timeout=60_000)
        assert page.evaluate(figures)[0].startswith("scatter")
        page.get_by_role("button", name="layer × token").click()
        page.wait_for_selector(".widget-output .js-plotly-plot .heatmaplayer", timeout=60_000)
        assert [f.split(",")[0] for f in page.evaluate(figures)] == ["heatmap"]  # replaced, not appended


# ------------------------------------------------------------------------------ memory
@pytest.mark.slow
def test_peak_rss_of_a_full_capture_stays_bounded(tmp_path):
    """qwen2.5-coder-0.5b, every block, 256 tokens, HF and candidate both resident: < 2.5x fp32 weights."""
    out = tmp_path / "rss.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "debug_rss.py"), "--ckpt", str(tmp_path / "ckpt"),
                    "--out", str(out)], check=True, cwd=ROOT, timeout=1800)
    result = json.loads(out.read_text())
    assert result["tokens"] == 256 and result["tensors_compared"] == 4 * result["layers"] + 3
    assert result["first_divergence"] is None and result["argmax_agreement"] == 1.0
    assert result["ratio"] < 2.5, result
