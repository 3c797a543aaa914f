"""nbtrt.bench: statistics against numpy, workloads, and a tiny end-to-end run whose JSON is complete."""
import json

import numpy as np
import pytest

from nbtrt import bench as B
from nbtrt.cli import main as cli_main
from nbtrt.testing import tiny_hf_model


@pytest.mark.parametrize("n", [1, 2, 7, 100])
def test_percentiles_match_numpy(n):
    rng = np.random.default_rng(n)
    timings = rng.lognormal(-3, 0.7, n).tolist()  # synthetic latencies, long-tailed like real ones
    for q in (0, 5, 50, 90, 95, 99, 100):
        assert B.percentile(timings, q) == pytest.approx(np.percentile(timings, q), rel=1e-12)
    s = B.summarize(timings)
    assert s["p50"] == pytest.approx(np.median(timings), rel=1e-12)
    assert s["p95"] == pytest.approx(np.percentile(timings, 95), rel=1e-12)
    assert s["mean"] == pytest.approx(np.mean(timings), rel=1e-12)
    assert (s["min"], s["max"], s["n"]) == (min(timings), max(timings), n)
    with pytest.raises(ValueError):
        B.percentile([], 50)


def test_request_metrics_from_step_times():
    start, steps = 10.0, [10.5, 10.6, 10.8, 11.1]  # first token after 0.5 s, then uneven gaps
    got = B.request_metrics(start, steps, [4, 2, 1])
    assert got[0] == pytest.approx({"ttft": 0.5, "latency": 1.1, "tpot": 0.6 / 3})
    assert got[1] == pytest.approx({"ttft": 0.5, "latency": 0.6, "tpot": 0.1})
    assert got[2]["tpot"] is None and got[2]["latency"] == pytest.approx(0.5)


def test_sharegpt_like_is_seeded_and_shaped():
    a, b = B.sharegpt_like(100, seed=0), B.sharegpt_like(100, seed=0)
    assert a.lengths == b.lengths and len(a.lengths) == 100
    assert B.sharegpt_like(100, seed=1).lengths != a.lengths
    big = B.sharegpt_like(20000, seed=0, max_input_len=10 ** 6, max_output_len=10 ** 6)
    ins, outs = np.array(big.lengths).T
    # the documented shape: means of ShareGPT (vLLM paper), long right tails (mean > median)
    assert ins.mean() == pytest.approx(B.SHAREGPT_SHAPE["input_mean"], rel=0.05)
    assert outs.mean() == pytest.approx(B.SHAREGPT_SHAPE["output_mean"], rel=0.05)
    assert np.median(ins) < ins.mean() and np.median(outs) < outs.mean()
    small = B.sharegpt_like(100, seed=0, scale=0.1, max_input_len=24, max_output_len=16)
    ins, outs = np.array(small.lengths).T
    assert ins.min() >= 4 and ins.max() <= 24 and outs.min() >= 2 and outs.max() <= 16


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return tiny_hf_model("LlamaForCausalLM", tmp_path_factory.mktemp("bench") / "tiny-llama")


def test_tiny_bench_end_to_end(tiny_src, tmp_path):
    mix = B.sharegpt_like(5, seed=0, scale=0.05, max_input_len=12, max_output_len=6, batch_size=2)
    loads = [B.fixed(2, 6, 4, repeats=2), mix]
    out = tmp_path / "bench.json"
    result = B.bench(tiny_src, ["hf-eager", "hf-compile", "nbtrt-torch", "nbtrt-tensorrt"], loads, work_dir=tmp_path / "w",
                     out=out, device="cpu", skip={"hf-compile": "not in this test"})
    saved = json.loads(out.read_text())
    assert saved["results"] == json.loads(json.dumps(result["results"]))
    for key in ("date", "torch", "transformers", "nbtrt", "platform", "gpu"):
        assert key in saved["machine"]
    by = {(r["runner"], r["workload"]): r for r in saved["results"]}
    assert len(by) == 8
    assert by[("hf-compile", mix.name)] == {**by[("hf-compile", mix.name)], "status": "skipped", "reason": "not in this test"}
    for runner in ("hf-eager", "nbtrt-torch"):
        fixed_r, mix_r = by[(runner, loads[0].name)], by[(runner, mix.name)]
        assert fixed_r["status"] == mix_r["status"] == "ok"
        assert fixed_r["generated_tokens"] == 2 * 4
        assert mix_r["generated_tokens"] == sum(n for _, n in mix.lengths)
        assert fixed_r["ttft_s"]["n"] == 2 * 2 and mix_r["latency_s"]["n"] == len(mix.lengths)
        for r in (fixed_r, mix_r):
            assert r["tokens_per_s"] > 0 and r["requests_per_s"] > 0 and r["peak_memory_bytes"] > 0
            assert r["ttft_s"]["p50"] <= r["latency_s"]["p50"] and r["latency_s"]["p50"] <= r["latency_s"]["p95"]
    trt = by[("nbtrt-tensorrt", loads[0].name)]
    assert trt["status"] == "skipped" and trt["reason"]
    text = B.table(result)
    assert "skipped" in text and "hf-eager" in text
    md = B.markdown(result).splitlines()
    assert md[0] == f"| runner | precision | {loads[0].name} | {mix.name} |"
    torch_row = next(line for line in md if line.startswith("| nbtrt-torch | fp32 |"))
    tps = by[("nbtrt-torch", mix.name)]["tokens_per_s"]
    speedup = tps / by[("hf-eager", mix.name)]["tokens_per_s"]
    assert torch_row.endswith(f"| {tps:.1f} ({speedup:.2f}×) |")
    assert any(line.startswith("Skipped: `nbtrt-tensorrt`: ") for line in md)

    # the repeats are kept, their spread shown, and a busy machine or disagreeing repeats are flagged
    fixed_r = by[("nbtrt-torch", loads[0].name)]
    assert len(fixed_r["tokens_per_s_repeats"]) == 2
    assert fixed_r["tokens_per_s"] == pytest.approx(sum(fixed_r["tokens_per_s_repeats"]) / 2)
    cores = saved["machine"]["cpu_count"]
    quiet = {**saved, "machine": {**saved["machine"], "load_average_1_5_15": [0.0, 0.0, 0.0]},
             "results": [{**r, "load_average_1m": 0.0, "tokens_per_s_repeats": [10.0, 10.5]} if r["status"] == "ok"
                         else r for r in saved["results"]]}
    assert B.warnings(quiet) == [] and "⚠" not in B.BenchReport(quiet)._repr_html_()
    busy = {**quiet, "machine": {**quiet["machine"], "load_average_1_5_15": [2.0 * cores, 0, 0]}}
    assert [w.split(":")[0] for w in B.warnings(busy)] == ["BUSY MACHINE"]
    noisy = {**quiet, "results": [dict(r, tokens_per_s_repeats=[10.0, 20.0]) if r["runner"] == "hf-eager" else r
                                  for r in quiet["results"]]}
    (disagree,) = B.warnings(noisy)
    assert disagree.startswith("REPEATS DISAGREE") and "hf-eager" in disagree and "nbtrt-torch" not in disagree
    html = B.BenchReport(noisy)._repr_html_()
    assert "REPEATS DISAGREE" in html and "tok_s_spread_pct" in html and "<table>" in html
    assert B.table(noisy).startswith("!! REPEATS DISAGREE")


def test_token_counts_equal_what_was_generated(tiny_src, tmp_path):
    """The JSON's token count is what the engine produced, counted independently by a spy on the runner."""
    runner = B.make_runners(tiny_src, ["nbtrt-torch"], device="cpu", work_dir=tmp_path, max_batch_size=3,
                            max_input_len=16, max_seq_len=32)[0]
    seen = []
    inner = runner.run

    def spy(prompts, lengths, tick):
        ticks = []
        got = inner(prompts, lengths, lambda: (ticks.append(1), tick()))
        seen.append((sum(got), len(ticks), max(lengths)))
        return got

    runner.run = spy
    mix = B.Workload("mix", ((5, 3), (9, 7), (2, 1), (4, 5)), batch_size=3, repeats=1)
    r = B.measure(runner, mix, vocab_size=257, warmup=0)
    assert r["generated_tokens"] == sum(s for s, _, _ in seen) == 3 + 7 + 1 + 5
    assert all(ticks == longest for _, ticks, longest in seen)  # one host sync per decoding step


def test_cli_bench_writes_json(tiny_src, tmp_path, capsys):
    out = tmp_path / "cli.json"
    rc = cli_main(["bench", str(tiny_src), "--runners", "nbtrt-torch", "--batch", "1,2", "--input-len", "5",
                   "--output-len", "3", "--repeats", "1", "--device", "cpu", "--work", str(tmp_path / "w"),
                   "--out", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert [r["generated_tokens"] for r in data["results"]] == [3, 6]
    assert "nbtrt-torch" in capsys.readouterr().out


def test_unknown_runner_is_an_error(tiny_src, tmp_path):
    with pytest.raises(ValueError, match="unknown runners"):
        B.make_runners(tiny_src, ["vllm"], work_dir=tmp_path)


def test_a_build_that_raises_is_reported_failed_not_skipped(tiny_src, tmp_path):
    """An engine that cannot be built with the given limits is a failure, listed with its error;
    a backend that is not installed here stays a skip."""
    runners = B.make_runners(tiny_src, ["nbtrt-torch", "nbtrt-tensorrt"], device="cpu", work_dir=tmp_path,
                             max_input_len=64, max_seq_len=32)
    results = [B.measure(r, B.fixed(1, 4, 2), vocab_size=64) for r in runners]
    by = {r["runner"]: r for r in results}
    assert by["nbtrt-torch"]["status"] == "failed"
    assert by["nbtrt-torch"]["reason"].startswith("ValueError: max_input_len (64) must not exceed max_seq_len (32)")
    assert by["nbtrt-tensorrt"]["status"] == "skipped"
    text = B.table({"results": results})
    assert "failed: ValueError" in text and "skipped: " in text
    md = B.markdown({"results": results})
    assert "Failed: `nbtrt-torch`: ValueError" in md and "Skipped: `nbtrt-tensorrt`: " in md


def test_engine_specs_are_data(tiny_src, tmp_path):
    """Two flavours of an engine are two specs, each built and loaded with its own options, which the
    runner records; an option the backend does not take fails that row with the backend's message.
    The checkpoint all three build from is converted once."""
    from nbtrt.bench.suite import Checkpoints, EngineSpec, engine_spec_runner
    from nbtrt.convert import hf_config

    ckpts = Checkpoints(tiny_src, tmp_path / "w")
    specs = [EngineSpec("ort-1-thread", "onnxruntime", "fp32", load={"threads": 1}),
             EngineSpec("torch-eager", "torch", "fp32", build={"compile": False}),
             EngineSpec("ort-bad", "onnxruntime", "fp32", build={"no_such_option": 1})]
    ort, eager, bad = [engine_spec_runner(s, ckpts, work_dir=tmp_path / "w", max_batch_size=2, max_input_len=8,
                                          max_seq_len=16) for s in specs]
    assert (ort.name, ort.info["load_options"]) == ("ort-1-thread", {"threads": 1})
    assert eager.info["build_options"] == {"compile": False} and eager.info["load_options"] == {}
    assert bad.failed.startswith("ValueError: ") and "no_such_option" in bad.failed
    assert list(ckpts.made) == ["fp32"]
    vocab = int(hf_config(tiny_src)["vocab_size"])
    for runner in (ort, eager):
        r = B.measure(runner, B.fixed(2, 4, 3, repeats=1), vocab_size=vocab, warmup=0)
        assert (r["status"], r["generated_tokens"], r["info"]["load_options"]) == ("ok", 6, runner.info["load_options"])
