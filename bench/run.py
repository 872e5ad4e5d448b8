"""The generation benchmark, in one command: `make bench`, or `.venv/bin/python -m bench.run`.

On the fixed workload (../shared/bench/prompts.jsonl: 256 chat requests, up to 128 new tokens, mixed sampling
parameters and seeds) it measures, each in a process of its own (so that peak RSS is per run):
  (a) naive: transformers generate, one request at a time with its own parameters (the first 32 requests)
  (b) static: transformers generate, batches of up to 64 requests with identical parameters, left padding, float32
  (c) the engine in-process, in float32 and in each precision/quantization that runs here, plus torch.ao's dynamic
      int8 for comparison; each with the quality guard (perplexity of float32's greedy answers to the first 50
      prompts)
  (d) the whole pipeline: `producer submit` -> local Redis (an empty database index) -> a real `workers start`
      -> a temporary SQLite file, from the submit command to the last committed result, in the fastest engine
      mode that passes the quality guard
and, where CUDA exists, a random ~1B Llama in bfloat16 on the GPU. It prints a table and writes docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.workload import DEFAULT_PROMPTS, QUALITY_PROMPTS, ROOT, machine

ENGINE_MODES = [("float32", "none"), ("bfloat16", "none"), ("float32", "int8"), ("bfloat16", "int8")]
QUALITY_LIMIT = 0.05
RSS_LIMIT_MIB = 2048
TARGETS = {
    "fp32": 1.5,  # engine float32 vs (b)
    "best": 3.0,  # fastest engine mode passing the quality guard vs (b)
    "naive": 25.0,  # engine vs (a)
    "pipeline": 0.9,  # (d) vs (c) in the same mode
}


def child(kind: str, out_dir: Path, prompts: Path, *extra: str, requests: int | None = None, timeout: float = 7200) -> dict[str, Any]:
    """Run `python -m bench.measure KIND` in its own process; its JSON result (or the error it died of)."""
    out = out_dir / f"{len(list(out_dir.glob('*.json')))}-{kind}.json"
    command = [sys.executable, "-m", "bench.measure", kind, "--out", str(out), "--prompts", str(prompts), *extra]
    if requests is not None:
        command += ["--requests", str(requests)]
    print(f"[bench] {kind} {' '.join(extra)} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-15:]
        print("\n".join(tail), file=sys.stderr)
        return {"error": tail[-1] if tail else f"exit {done.returncode}"}
    result = json.loads(out.read_text())
    print(f"[bench]   done in {time.perf_counter() - started:.0f}s: {summary(result)}", file=sys.stderr, flush=True)
    return result


def summary(result: dict[str, Any]) -> str:
    if "tokens" in result and result.get("seconds"):
        return f"{result['tokens']} tokens in {result['seconds']:.1f}s = {result['tokens'] / result['seconds']:.1f} tokens/s"
    return json.dumps(result)[:200]


def rate(result: dict[str, Any]) -> float | None:
    if "tokens" not in result or not result.get("seconds"):
        return None
    return result["tokens"] / result["seconds"]


def mode_name(dtype: str, quantize: str) -> str:
    return dtype if quantize == "none" else f"{quantize}+{dtype}"


def passes_guard(result: dict[str, Any], base_ppl: float | None) -> bool | None:
    if base_ppl is None or "perplexity" not in result:
        return None
    return abs(result["perplexity"] / base_ppl - 1) <= QUALITY_LIMIT


def fmt(value: float | None, spec: str = ".1f", suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def build_rows(results: dict[str, dict[str, Any]]) -> tuple[list[list[str]], dict[str, Any]]:
    """The table's rows and the figures the targets are judged on."""
    naive, static = rate(results["naive"]), rate(results["static"])
    base_ppl = results.get("engine float32", {}).get("perplexity")
    rows = []
    facts: dict[str, Any] = {"naive": naive, "static": static, "base_ppl": base_ppl}
    for key, result in results.items():
        if key in ("matmul", "gpu"):
            continue
        r = rate(result)
        ppl = result.get("perplexity")
        guard = passes_guard(result, base_ppl)
        change = None if ppl is None or base_ppl is None else ppl / base_ppl - 1
        rows.append([
            key, result.get("precision", "–"), result.get("quantize", "–"), str(result.get("requests", "–")),
            str(result.get("tokens", "–")), fmt(result.get("seconds")), fmt(r), fmt(r / naive if r and naive else None, ".1f", "×"),
            fmt(r / static if r and static else None, ".2f", "×"), fmt(result.get("rss_mib"), ".0f"),
            fmt(ppl, ".3f"), "" if change is None else f"{change:+.1%}{'' if guard else ' FAIL'}",
        ] if "error" not in result else [key, "–", "–", "–", "–", "–", "–", "–", "–", "–", "–", f"error: {result['error']}"])
    return rows, facts


HEADER = ["run", "precision", "quantization", "requests", "generated tokens", "seconds", "tokens/s", "vs (a)", "vs (b)",
          "peak RSS MiB", "perplexity", "vs float32"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def judge(results: dict[str, dict[str, Any]], best: str | None, pipeline_key: str | None) -> list[tuple[str, bool | None, str]]:
    """(target, met, the figures) for each of the issue's targets."""
    naive, static = rate(results["naive"]), rate(results["static"])
    fp32 = rate(results.get("engine float32", {}))
    out: list[tuple[str, bool | None, str]] = []

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    r = ratio(fp32, static)
    out.append((f"engine float32 ≥ {TARGETS['fp32']}× (b)", None if r is None else r >= TARGETS["fp32"], f"{fmt(r, '.2f')}×"))
    best_rate = rate(results[best]) if best else None
    r = ratio(best_rate, static)
    out.append((f"fastest mode passing the quality guard ({best}) ≥ {TARGETS['best']}× (b)",
                None if r is None else r >= TARGETS["best"], f"{fmt(r, '.2f')}×"))
    r = ratio(best_rate, naive)
    out.append((f"engine ({best}) ≥ {TARGETS['naive']:.0f}× (a)", None if r is None else r >= TARGETS["naive"],
                f"{fmt(r, '.1f')}× (float32: {fmt(ratio(fp32, naive), '.1f')}×)"))
    if pipeline_key:
        d = results[pipeline_key]
        same = "engine " + mode_name(d.get("precision", "?"), d.get("quantize", "?"))
        r = ratio(rate(d), rate(results.get(same, {})))
        out.append((f"pipeline (d) ≥ {TARGETS['pipeline']}× engine (c), same mode ({same[7:]})",
                    None if r is None else r >= TARGETS["pipeline"], f"{fmt(r, '.2f')}×"))
    rss = {k: v.get("rss_mib") for k, v in results.items() if k.startswith(("engine", "pipeline")) and v.get("rss_mib")}
    worst = max(rss.items(), key=lambda kv: kv[1]) if rss else None
    out.append((f"worker peak RSS ≤ {RSS_LIMIT_MIB / 1024:.0f} GiB",
                None if worst is None else worst[1] <= RSS_LIMIT_MIB,
                "–" if worst is None else f"largest {worst[1]:.0f} MiB ({worst[0]})"))
    base = results.get("engine float32", {}).get("perplexity")
    for key, result in results.items():
        if key.startswith("engine ") and key != "engine float32" and "perplexity" in result and base:
            change = result["perplexity"] / base - 1
            out.append((f"quality guard: {key[7:]} within {QUALITY_LIMIT:.0%} of float32", abs(change) <= QUALITY_LIMIT, f"{change:+.2%}"))
    return out


def report(results: dict[str, dict[str, Any]], info: dict[str, str], command: str, best: str | None, pipeline_key: str | None, wall: float) -> str:
    rows, facts = build_rows(results)
    verdicts = judge(results, best, pipeline_key)
    lines = [
        "# Generation benchmark",
        "",
        f"Written by `{command}` ({time.strftime('%Y-%m-%d %H:%M')}, {wall / 60:.0f} minutes). Figures are from one run on one machine:",
        "compare ratios within this run, not with runs elsewhere.",
        "",
        "## Machine",
        "",
        f"- CPU: {info['cpu']}, {info['cpus']} CPUs",
        f"- SIMD flags: {info['simd']}",
        f"- torch {info['torch']}",
        f"- GPU: {info['cuda']}",
        "",
        "## Results",
        "",
        "Workload: `../shared/bench/prompts.jsonl`, 256 chat requests, max_new_tokens 128, five sampling configurations,",
        "one seed per request. Generated tokens are the tokens of the answers (end-of-sequence and padding not",
        f"counted). (a) runs the first {results['naive'].get('requests', '?')} requests; everything else all 256. Peak RSS is the process's",
        "(model load included); for (d) the worker's whole process tree. Perplexity: of float32's greedy answers to the",
        f"first {QUALITY_PROMPTS} prompts, under each mode (the quality guard: within {QUALITY_LIMIT:.0%} of float32).",
        "",
        markdown_table(HEADER, rows),
        "",
        "## Targets",
        "",
        markdown_table(["target", "met", "figure"], [[t, "–" if m is None else ("met" if m else "MISSED"), f] for t, m, f in verdicts]),
        "",
    ]
    profile = {k: v["profile"] for k, v in results.items() if "profile" in v}
    if profile:
        lines += ["## Where the engine's time goes", "",
                  "CPU time by kind of operator (torch.profiler, 64 requests x 24 new tokens, one run per mode):", "",
                  markdown_table(["mode", "matrix products", "attention", "sampling", "other"],
                                 [[k[7:], *(f"{v.get(c, 0):.0%}" for c in ("matmul", "attention", "sampling", "other"))] for k, v in profile.items()]),
                  ""]
    matmul = results.get("matmul", {})
    if "gflops" in matmul:
        per_token = matmul["flop_per_token"] / 1e9
        lines += ["Measured matrix-product rates of this CPU (GFLOP/s) and the token rate they would allow at "
                  f"{per_token:.3f} GFLOP per token (2 x the Linear weights, LM head included):", ""]
        lines += [f"- {name}: {g:.0f} GFLOP/s = {g / per_token:.0f} tokens/s" for name, g in matmul["gflops"].items()]
        lines.append("")
        for key in ("engine float32", "engine bfloat16"):
            r = rate(results.get(key, {}))
            dtype = key.split()[-1]
            g = matmul["gflops"].get(f"{dtype} decode (64x576 @ 576x1536)")
            if r and g:
                lines.append(f"- {key}: {r:.0f} tokens/s = {r * per_token / g:.0%} of the {dtype} decode-shape product rate")
        lines.append("")
    gpu = results.get("gpu", {})
    lines += ["## GPU", ""]
    if "skipped" in gpu or not gpu:
        lines += [f"Not run: {gpu.get('skipped', 'no GPU result')}. `python -m bench.run` runs it where CUDA exists "
                  "(a random 1.2B-parameter Llama, TinyLlama's shape, in bfloat16; every request 128 tokens, EOS ignored; "
                  "tokens/s and the fraction of the card's measured bfloat16 8192² matmul rate). No GPU figure here.", ""]
    elif "error" in gpu:
        lines += [f"Failed: {gpu['error']}", ""]
    else:
        lines += [f"{gpu['device']}: random Llama with {gpu['parameters'] / 1e9:.2f}B parameters, bfloat16, "
                  f"{gpu['requests']} requests x 128 tokens: {gpu['tokens'] / gpu['seconds']:.0f} tokens/s; "
                  f"measured bf16 matmul {gpu['matmul_gflops'] / 1000:.0f} TFLOP/s; the engine reaches "
                  f"{gpu['fraction_of_matmul']:.1%} of it; peak GPU memory {gpu['rss_mib']:.0f} MiB.", ""]
    lines += [ANALYSIS_HEADING, "", Path(ROOT / "bench" / "analysis.md").read_text().strip(), ""]
    return "\n".join(lines)


ANALYSIS_HEADING = "## What bounds each figure, and what would move it"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    parser.add_argument("--naive-requests", type=int, default=32)
    parser.add_argument("--requests", type=int, default=None, help="Only the first N requests (a quick check, not a benchmark).")
    parser.add_argument("--modes", default=",".join(mode_name(d, q) for d, q in ENGINE_MODES),
                        help="Engine modes: float32, bfloat16, int8+float32, int8+bfloat16 (comma-separated).")
    parser.add_argument("--skip", default="", help="Runs to leave out (a quick check, not a benchmark): "
                        "naive, static, aodynamic, pipeline, matmul, gpu (comma-separated).")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379", help="Redis server for (d); an empty database index is used.")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md", help="Markdown report ('-': none).")
    args = parser.parse_args()
    prompts = args.prompts.resolve()
    if not prompts.is_file():
        sys.exit(f"{prompts}: no such file (the workload lives in ../shared/bench/prompts.jsonl)")
    command = "python -m bench.run " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bulkgen-bench-"))
    reference = tmp / "reference.json"
    info = machine()
    results: dict[str, dict[str, Any]] = {}
    modes = []
    for name in args.modes.split(","):
        quantize, _, dtype = name.rpartition("+")
        modes.append((dtype, quantize or "none"))
    if ("float32", "none") not in modes:
        modes.insert(0, ("float32", "none"))  # the quality guard's reference
    modes.sort(key=lambda m: m != ("float32", "none"))
    for dtype, quantize in modes:
        extra = ["--dtype", dtype, "--quantize", quantize, "--reference", str(reference)]
        if (dtype, quantize) == ("float32", "none"):
            extra.append("--make-reference")
        results["engine " + mode_name(dtype, quantize)] = child("engine", tmp, prompts, *extra, requests=args.requests)
    skip = set(filter(None, args.skip.split(",")))
    if "aodynamic" not in skip:
        results["engine int8 torch.ao dynamic"] = child("aodynamic", tmp, prompts, "--reference", str(reference), requests=args.requests)
    results["naive"] = {} if "naive" in skip else child(
        "naive", tmp, prompts, requests=min(args.naive_requests, args.requests or args.naive_requests))
    results["static"] = {} if "static" in skip else child("static", tmp, prompts, requests=args.requests)
    base = results["engine float32"].get("perplexity")
    offered = {k: v for k, v in results.items() if k.startswith("engine ") and "torch.ao" not in k and rate(v)}
    passing = {k: v for k, v in offered.items() if k == "engine float32" or passes_guard(v, base)}
    best = max(passing, key=lambda k: rate(passing[k])) if passing else None  # type: ignore[arg-type,return-value]
    pipeline_key = None
    if "pipeline" not in skip and best:
        d = results[best]
        pipeline_key = f"pipeline {mode_name(d['precision'], d['quantize'])}"
        results[pipeline_key] = child("pipeline", tmp, prompts, "--dtype", d["precision"], "--quantize", d["quantize"],
                                      "--broker", args.broker, requests=args.requests)
    results["matmul"] = {} if "matmul" in skip else child("matmul", tmp, prompts)
    results["gpu"] = {"skipped": "--skip gpu"} if "gpu" in skip else child("gpu", tmp, prompts, requests=args.requests)
    wall = time.perf_counter() - started

    rows, _ = build_rows(results)
    print()
    print(markdown_table(HEADER, rows))
    print()
    for target, met, figure in judge(results, best, pipeline_key):
        print(f"{'–' if met is None else ('met   ' if met else 'MISSED')}  {target}: {figure}")
    if str(args.out) != "-":
        args.out.write_text(report(results, info, command, best, pipeline_key, wall))
        print(f"\nwrote {args.out}")
    (tmp / "results.json").write_text(json.dumps(results, indent=1))
    print(f"raw results: {tmp / 'results.json'}")


if __name__ == "__main__":
    main()
