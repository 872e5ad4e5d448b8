"""bench.gpu's code path on the CPU (`--small`: tiny shapes), since CI has no GPU; and its profile arithmetic."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from types import SimpleNamespace

import torch

from bench.gpu import WINDOW, EngineOptions, engine_options, event_counts, parse_args, union_seconds, verdicts
from tests.test_engine import _smollm2_available

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_busy_time_counts_overlapping_kernels_once():
    assert union_seconds([(0, 10), (5, 20), (30, 40)]) == pytest.approx(30e-6)
    assert union_seconds([(0, 100), (10, 20)]) == pytest.approx(100e-6)
    assert union_seconds([]) == 0


def event(name: str, start: float, end: float, cuda: bool = False) -> SimpleNamespace:
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    return SimpleNamespace(name=name, device_type=kind, time_range=SimpleNamespace(start=start, end=end), is_user_annotation=False)


def test_profile_counts_come_from_the_decode_window_and_the_kernels():
    events = [
        event("cudaLaunchKernel", 0, 1),  # before the window: not a decode step's
        event(WINDOW, 10, 100), event(WINDOW, 10, 100, cuda=True),  # the annotation, and its GPU-side twin
        event("aten::mm", 11, 20), event("cudaLaunchKernel", 12, 13), event("cudaLaunchKernelExC", 14, 15),
        event("cudaStreamSynchronize", 30, 40), event("cudaMemcpyAsync", 29, 30),
        event("gemm_kernel", 20, 60, cuda=True), event("softmax_kernel", 50, 70, cuda=True),
        event("Memcpy DtoH (Device -> Pageable)", 70, 75, cuda=True),
    ]
    counts = event_counts(events, steps=2, plain_wall=100e-6, cuda=True)
    assert counts["gpu_busy_s"] == pytest.approx(50e-6) and counts["gpu_busy_fraction"] == 0.5  # kernels 20-70, not the copy
    assert counts["kernels_per_step"] == 1 and counts["launches_per_step"] == 1 and counts["aten_ops_per_step"] == 0.5
    assert counts["syncs_per_step"] == 0.5 and counts["sync_calls"] == {"cudaStreamSynchronize": 1}
    assert counts["memcpy_dtoh_per_step"] == 0.5
    assert counts["top_kernels_ms_per_step"] == {"gemm_kernel": 0.02, "softmax_kernel": 0.01}  # where the GPU's time goes
    assert event_counts(events, steps=2, plain_wall=1.0, cuda=False)["syncs_per_step"] is None  # no GPU: not measured


def test_the_summary_judges_only_what_was_measured():
    records = [{"step": "tput", "shape": "1b", "rows": 256, "tok_s": 6_000.0, "graphs": "off", "quantize": "none"},
               {"step": "tput", "shape": "1b", "rows": 256, "tok_s": 41_000.0, "graphs": "on", "quantize": "none"},
               {"step": "hf", "shape": "1b", "rows": 256, "tok_s": 5_000.0},
               {"step": "tput", "shape": "8b", "rows": 256, "error": "OutOfMemoryError: ..."},
               {"step": "profile", "shape": "1b", "rows": 256, "gpu_busy_fraction": 0.5, "syncs_per_step": 1.0, "graphs": "on"},
               {"step": "tput", "shape": "1b", "rows": 256, "tok_s": 40_000.0, "graphs": "on", "quantize": "int8"},
               {"step": "tput", "shape": "1b", "rows": 256, "graphs": "on", "quantize": "int4", "error": "RuntimeError: ..."},
               {"step": "pipeline", "shape": "1b", "rows": 256, "tok_s": 39_360.0, "status": "completed", "failed": 0},
               {"step": "tput", "shape": "1b", "rows": 256, "tok_s": 38_000.0, "graphs": "on", "compile": "on", "quantize": "none"}]
    table = {target: (figure, verdict) for target, figure, verdict in verdicts(records, small=False)}
    assert table["1b at 256 rows ≥ 40,000 tokens/s"] == (
        "41,000 tokens/s (graphs); compiled 38,000; eager 6,000; generate 5,000", "met")  # the faster graphed run judged
    assert table["8b at 256 rows ≥ 20,000 tokens/s"][1] == "not measured"
    assert table["GPU busy ≥ 85% of decode wall time (1b at 256 rows, graphs on)"] == ("50%", "not met")
    assert table["≤ 1 host synchronisation per decode step (1b at 256 rows, graphs on)"] == ("1.00", "met")
    assert table["whole pipeline ≥ 0.95× the engine alone (1b at 256 rows)"] == (
        "39,360 tokens/s = 0.96× the engine alone (41,000)", "met")
    assert table["int8 faster than bfloat16 (1b at 256 rows)"] == ("40,000 tokens/s; bfloat16 41,000", "not met")
    assert table["int4 faster than bfloat16 (1b at 256 rows)"] == ("–", "not measured")  # it failed: no figure
    failed_pipeline = dict(records[-2], failed=3)
    assert verdicts(records[:-2] + [failed_pipeline], small=False)[-3][1:] == (
        "39,360 tokens/s = 0.96× the engine alone (41,000); job completed, 3 requests failed", "not met")
    eager_only = verdicts([dict(records[0]), dict(records[2])], small=False)
    assert eager_only[0][1:] == ("6,000 tokens/s; generate 5,000", "not met")  # without a graphed run, the eager one is judged


def test_compile_is_measured_only_with_graphs_and_bad_choices_are_refused():
    args = parse_args(["--graphs", "on,off", "--compile", "off,on", "--quantize", "int8"])
    assert engine_options(args) == [EngineOptions(True, 0, False), EngineOptions(True, 0, True), EngineOptions(False, 0, False)]
    assert args.quantize == ["int8"] and parse_args([]).quantize == [] and parse_args([]).compile == [False]
    for bad in (["--compile", "yes"], ["--quantize", "int3"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


@pytest.mark.slow
@pytest.mark.skipif(not _smollm2_available(), reason="the tokenizer comes from the bundled SmolLM2 GGUF, which is not installed")
def test_the_small_gpu_benchmark_runs_on_the_cpu_and_records_every_step(tmp_path):
    out = tmp_path / "gpu.jsonl"
    prompts = tmp_path / "prompts.jsonl"  # its own: a clone of the project need not have ../shared beside it
    prompts.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": f"Say something about the number {i}."}], "temperature": 0.7}) + "\n"
        for i in range(12)
    ))
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", "--small", "--device", "cpu", "--shapes", "1b", "--steps", "tput,hf,profile,pipeline",
         "--quantize", "int8,int4", "--prompts", str(prompts), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["step"], r.get("graphs"), r.get("quantize")) for r in lines] == [
        ("env", None, None), ("tput", "on", "none"), ("tput", "off", "none"), ("hf", None, None), ("tput", "on", "int8"),
        ("tput", "on", "int4"), ("pipeline", None, None), ("profile", "on", None), ("profile", "off", None)
    ]
    int8, int4, pipeline = lines[4:7]
    assert int8["tok_s"] > 0 and int8["every_row_full"] and "error" not in int8
    assert "does not run on the CPU" in int4["skipped"]  # workers.quantize's refusal, said as the worker says it
    # the whole path: a real worker, an embedded Redis, SQLite; every request exactly --new-tokens tokens
    assert (pipeline["status"], pipeline["failed"], pipeline["requests_done"], pipeline["tokens"]) == ("completed", 0, 16, 16 * 8)
    lines = [r for r in lines if r.get("quantize") in (None, "none") and r["step"] != "pipeline"]
    graphed = [r for r in lines if r.get("graphs") == "on"]
    assert all(r["decode_graphs"] >= 1 and r["graphs_failed"] is None for r in graphed), graphed  # static steps, run eagerly
    assert {(r["attention"], r["cascade"]) for r in lines if "attention" in r} == {("products", "products")}  # a CPU's
    records = {r["step"]: r for r in lines if r.get("graphs") != "on"}
    assert records["env"]["skipped"] == "no CUDA device"
    assert all("error" not in r for r in records.values()), [r.get("error") for r in records.values()]
    assert records["tput"]["tok_s"] > 0 and records["tput"]["every_row_full"]
    assert records["tput"]["tokens"] == records["hf"]["tokens"] == 16 * 8  # every request exactly --new-tokens tokens
    assert records["hf"]["tok_s"] > 0
    profile = records["profile"]
    assert profile["steps"] == 8 and profile["rows_at_end"] == 8 and profile["plain_wall_s"] > 0
    assert profile["gpu_busy_fraction"] is None and profile["syncs_per_step"] is None  # no GPU: its fields say so
    assert profile["host_reads_per_step"] >= 1 and "host_read" in profile["host_reads"]  # counted on any device
    assert records["tput"]["device"] == "cpu" and records["tput"]["command"].startswith("python -m bench.gpu --small")
    assert "| 1b at 256 rows ≥ 40,000 tokens/s | – | not measured (--small) |" in done.stdout
    assert "| whole pipeline ≥ 0.95× the engine alone (1b at 8 rows) |" in done.stdout
    assert "| int8 faster than bfloat16 (1b at 8 rows) |" in done.stdout
