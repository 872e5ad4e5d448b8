"""One measurement per process: `python -m bench.measure KIND --out result.json [options]`.

bench.run starts each in its own process so that its peak RSS is its own. KIND is
  naive     (a) transformers generate, one request at a time with its own parameters
  static    (b) transformers generate, batches of up to 64 requests with identical parameters, left padding
  engine    (c) Engine.generate on every request at once, in --dtype/--quantize; then the quality guard
  aodynamic     as engine, with torch.ao's dynamic int8 (measured to choose int8; the engine does not offer it)
  pipeline  (d) producer submit -> Redis -> a real `workers start` process -> SQLite, submit to last result
  matmul        this machine's float32/bfloat16 matrix-product rate, at the shapes of a decode step
Each writes one JSON object to --out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.workload import (
    MODEL,
    cpu_seconds,
    tree_cpu_seconds,
    QUALITY_PROMPTS,
    QUALITY_TOKENS,
    ROOT,
    peak_rss_mib,
    perplexity,
    prompt_ids,
    read_lines,
    real_tokens,
    to_requests,
    tree_rss_mib,
)

if TYPE_CHECKING:
    from workers.types import GenerationRequest

STATIC_BATCH = 64
BATCH_ROWS = 64
"""The workers' batch size (BULKGEN_BATCH_SIZE's default): once fewer requests than this are left per process,
its batch can only drain."""
FLEET_REQUESTS = 2000
FLEET_NEW_TOKENS = 24
"""The fleet run: requests, each with this max_new_tokens (short, so that 2,000 requests take minutes)."""


def load_reference(path: Path):  # type: ignore[no-untyped-def]
    return [(p, a) for p, a in json.loads(path.read_text())]


# --- (a) and (b): transformers' own generate ----------------------------------------------------------------------


def hf_kwargs(params, eos_ids: list[int], pad_id: int) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """generate() arguments for one parameter set; top_k=0 and top_p=1.0 given explicitly, or transformers'
    generation config would add its own top_k=50."""
    common = dict(max_new_tokens=params.max_new_tokens, eos_token_id=eos_ids, pad_token_id=pad_id,
                  repetition_penalty=params.repetition_penalty)
    if params.temperature == 0:
        return common | dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return common | dict(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)


def static_batches(requests: list[GenerationRequest], batch_size: int) -> list[list[int]]:
    """Request indexes in batches of at most batch_size whose sampling parameters are one generate() call's."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(requests):
        p = r.params
        groups.setdefault((p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.repetition_penalty), []).append(i)
    return [ids[i : i + batch_size] for ids in groups.values() for i in range(0, len(ids), batch_size)]


def hf_generate(lines: list[dict[str, Any]], batch_size: int, dtype: str) -> dict[str, Any]:
    """transformers generate over lines, in batches of identical parameters (batch_size 1: one at a time)."""
    import torch

    from workers.finish import eos_token_ids
    from workers.loader import load_model
    from contract.registry import resolve

    model, tokenizer = load_model(resolve(MODEL), "cpu", dtype)
    eos = sorted(eos_token_ids(model, tokenizer))
    requests = to_requests(lines)
    batches = static_batches(requests, batch_size)

    def run(batch: list[int]) -> int:
        texts = [tokenizer.decode(prompt_ids(tokenizer, requests[i])) for i in batch]
        encoded = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")  # left padding
        torch.manual_seed(requests[batch[0]].params.seed or 0)  # one seed per call: generate has no per-row seeds
        with torch.inference_mode():
            out = model.generate(**encoded, **hf_kwargs(requests[batch[0]].params, eos, tokenizer.pad_token_id))
        return sum(real_tokens(row, set(eos)) for row in out[:, encoded.input_ids.shape[1] :].tolist())

    run([batches[0][0]])  # warm-up
    started, cpu = time.perf_counter(), cpu_seconds()
    tokens = sum(run(batch) for batch in batches)
    seconds = time.perf_counter() - started
    return dict(requests=len(requests), tokens=tokens, seconds=seconds, cpu_seconds=cpu_seconds() - cpu,
                batches=len(batches), precision=dtype, quantize="none", rss_mib=peak_rss_mib())


# --- (c): the engine ----------------------------------------------------------------------------------------------


def profile_shares(engine, requests) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Where a short engine run spends its CPU time, by kind of operator (torch.profiler)."""
    from torch.profiler import profile

    with profile() as prof:
        engine.generate(requests)
    kinds = {"matmul": 0.0, "attention": 0.0, "sampling": 0.0, "other": 0.0}
    total = 0.0
    for event in prof.key_averages():
        t = event.self_cpu_time_total
        total += t
        name = event.key
        if name in ("aten::mm", "aten::addmm") or "int8" in name or "int4" in name or "quantized::" in name:
            kinds["matmul"] += t
        elif name in ("aten::bmm", "aten::_softmax", "aten::masked_fill_", "aten::_index_put_impl_"):
            kinds["attention"] += t
        elif name in ("aten::topk", "aten::cumsum", "aten::exp_", "aten::argmax", "aten::searchsorted", "aten::logsumexp",
                      "aten::max", "aten::sort"):
            kinds["sampling"] += t
        else:
            kinds["other"] += t
    return {k: round(v / total, 3) for k, v in kinds.items()} if total else kinds


def run_engine(engine, lines: list[dict[str, Any]], reference: Path | None, make_reference: bool, extras: bool = True) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """Time one generate over every line; with extras, also profile a short run and measure the quality guard."""
    from workers.types import SamplingParams

    requests = to_requests(lines)
    engine.generate([r for r in to_requests(lines[:4])])  # warm-up (first calls allocate)
    started, cpu = time.perf_counter(), cpu_seconds()
    results = engine.generate(requests)
    seconds = time.perf_counter() - started
    failed = [r.error for r in results if r.error]
    tokens = sum(s.completion_tokens for r in results for s in r.samples)
    out = dict(requests=len(requests), tokens=tokens, seconds=seconds, cpu_seconds=cpu_seconds() - cpu,
               failed=len(failed), precision=engine.dtype, quantize=engine.quantize, rss_mib=peak_rss_mib())
    prefix = engine.scheduler.prefix if engine.continuous else None
    if prefix is not None:  # the warm-up's rows count too: they are the same workload's first lines
        out["prefix_cache"] = dict(hit_tokens=prefix.hit_tokens, prompt_tokens=prefix.looked_up_tokens,
                                   hit_rate=round(prefix.hit_tokens / max(1, prefix.looked_up_tokens), 4),
                                   cached_tokens=sum(s.cached_tokens for r in results for s in r.samples),
                                   held_tokens=prefix.tokens, mib=round(prefix.nbytes() / 2**20, 1))
    if engine.continuous and engine.scheduler.speculation is not None:  # the timed run's samples only
        samples = [s for r in results for s in r.samples]
        proposed, kept = sum(s.draft_tokens for s in samples), sum(s.accepted_tokens for s in samples)
        out["speculation"] = dict(draft_tokens=proposed, accepted_tokens=kept, acceptance=round(kept / max(1, proposed), 4),
                                  rows_with_drafts=sum(1 for s in samples if s.draft_tokens),
                                  decode_steps_saved_pct=round(100 * kept / max(1, sum(s.completion_tokens for s in samples)), 1))
    if not extras:
        return out

    short = to_requests(lines[:64])
    for r in short:
        r.params.max_new_tokens = 24
    out["profile"] = profile_shares(engine, short)

    if make_reference:  # the quality guard's fixed text: float32's greedy answers to the first prompts
        chats = to_requests(lines[:QUALITY_PROMPTS])
        for r in chats:
            r.params = SamplingParams(max_new_tokens=QUALITY_TOKENS, temperature=0.0)
        answers = engine.generate(chats)
        pairs = [
            (prompt_ids(engine.tokenizer, c), engine.tokenizer(a.samples[0].text, add_special_tokens=False).input_ids)
            for c, a in zip(chats, answers)
        ]
        reference.write_text(json.dumps(pairs))
    out["perplexity"] = perplexity(engine.model, load_reference(reference))
    return out


def engine_mode(lines: list[dict[str, Any]], dtype: str, quantize: str, reference: Path | None, make_reference: bool,
                extras: bool = True, static: bool = False, prefix_cache_tokens: int | None = None,
                speculative_tokens: int | None = None, batch_rows: int = 64, draft_model: str | None = None,
                speculate_always: bool = False) -> dict[str, Any]:
    """The engine in-process; static: on the path of architectures workers.decoder does not run (static batches on
    transformers' forward), to measure what that path costs."""
    from workers.engine import Engine
    from contract.registry import resolve

    more = {} if prefix_cache_tokens is None else {"prefix_cache_tokens": prefix_cache_tokens}
    if speculative_tokens is not None:
        more["speculative_tokens"] = speculative_tokens
    if draft_model is not None:
        more["draft_spec"] = resolve(draft_model)
    engine = Engine.load(resolve(MODEL), "cpu", dtype, quantize, max_batch_rows=batch_rows, static_batches=static, **more)
    if speculate_always and engine.continuous and engine.scheduler.speculation is not None:
        engine.scheduler.speculation.always = True
    return run_engine(engine, lines, reference, make_reference, extras)


def aodynamic_mode(lines: list[dict[str, Any]], reference: Path) -> dict[str, Any]:
    """torch.ao's dynamic int8 (int8 weights, activations quantized per tensor at run time) on every Linear."""
    import torch

    from workers.engine import Engine
    from workers.loader import load_model
    from contract.registry import resolve

    model, tokenizer = load_model(resolve(MODEL), "cpu", "float32")
    torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    engine = Engine(model, tokenizer, "cpu", MODEL, "float32", "none", max_batch_rows=64, batch_invariant=False)
    out = run_engine(engine, lines, reference, False)
    out["quantize"] = "int8 (torch.ao dynamic)"
    return out


# --- (d): the whole pipeline --------------------------------------------------------------------------------------


def free_redis_db(base_url: str) -> str:
    """base_url with the highest database index that holds no key (the tests pick theirs at random from 1-15)."""
    import redis

    for index in range(15, 0, -1):
        url = f"{base_url.rstrip('/')}/{index}"
        client = redis.Redis.from_url(url)
        try:
            if client.dbsize() == 0:
                return url
        finally:
            client.close()
    raise RuntimeError(f"no empty Redis database on {base_url}")


def scrape_occupancy(port: int) -> tuple[float, float]:
    """(sum, count) of a worker process's bulkgen_batch_occupancy histogram: (0, 0) while it serves nothing."""
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    except OSError:
        return 0.0, 0.0
    total = sum(float(v) for v in re.findall(r"^bulkgen_batch_occupancy_sum\{[^}]*\} (\S+)$", text, re.M))
    count = sum(float(v) for v in re.findall(r"^bulkgen_batch_occupancy_count\{[^}]*\} (\S+)$", text, re.M))
    return total, count


def occupancy_summary(timeline: list[tuple[float, int, float, float]], total: int, drain_from: int | None = None) -> dict[str, Any]:
    """From (seconds, requests done, occupancy sum, decode steps) samples summed over the worker processes: the
    mean occupancy while requests still waited to join (until `drain_from` were done: from there on the last
    batches can only drain), until the last 5% of requests, over the whole job, and per tenth of the requests."""
    def mean_between(rows: list[tuple[float, int, float, float]]) -> float | None:
        if len(rows) < 2 or rows[-1][3] <= rows[0][3]:
            return None
        return (rows[-1][2] - rows[0][2]) / (rows[-1][3] - rows[0][3])

    until = [row for row in timeline if row[1] < 0.95 * total]
    if until and until[-1] is not timeline[-1]:
        until.append(timeline[len(until)])  # through the sample where the 95% mark was passed
    tenths = []
    for k in range(10):
        rows = [row for row in timeline if k * total / 10 <= row[1] <= (k + 1) * total / 10]
        tenths.append(None if mean_between(rows) is None else round(mean_between(rows), 3))  # type: ignore[arg-type]
    waiting = [row for row in timeline if drain_from is not None and row[1] < drain_from]
    return {
        "while_requests_waited": None if mean_between(waiting) is None else round(mean_between(waiting), 3),  # type: ignore[arg-type]
        "until_last_5pct": None if mean_between(until) is None else round(mean_between(until), 3),  # type: ignore[arg-type]
        "whole_job": None if mean_between(timeline) is None else round(mean_between(timeline), 3),  # type: ignore[arg-type]
        "per_tenth_of_requests": tenths,
    }


def pipeline_mode(
    prompts: Path, dtype: str, quantize: str, broker: str, timeout: float, processes: int = 1
) -> dict[str, Any]:
    """submit -> Redis -> `workers start --concurrency processes` -> SQLite, from the submit to the last result;
    each pool process's occupancy scraped from its metrics endpoint twice a second."""
    import redis

    from bench.scale.services import stop_group

    broker_url = free_redis_db(broker)
    tmp = Path(tempfile.mkdtemp(prefix="bulkgen-bench-"))
    database = tmp / "store.db"
    metrics_port = free_port_block(processes)
    env = dict(os.environ, BULKGEN_DATABASE_URL=f"sqlite:///{database}", BULKGEN_BROKER_URL=broker_url,
               BULKGEN_MODEL=MODEL, BULKGEN_DTYPE=dtype, BULKGEN_QUANTIZE=quantize, BULKGEN_METRICS_PORT=str(metrics_port),
               BULKGEN_RECONCILE_INTERVAL_S="0", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    def cli(module: str) -> list[str]:
        return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]

    subprocess.run([*cli("producer.cli"), "db", "upgrade"], env=env, cwd=ROOT, check=True, capture_output=True)
    log_path = tmp / "worker.log"
    log = log_path.open("w")
    worker = subprocess.Popen([*cli("workers.cli"), "start", "--concurrency", str(processes)], env=env, cwd=ROOT,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    peak = [0.0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_rss_mib(worker.pid))
            stop.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 900
        while not (log_path.read_text().count("loaded model") >= processes and " ready." in log_path.read_text()):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        started, cpu = time.perf_counter(), tree_cpu_seconds(worker.pid)
        submitted = subprocess.run([*cli("producer.cli"), "submit", str(prompts), "--model", MODEL],
                                   env=env, cwd=ROOT, capture_output=True, text=True, check=True)
        job = int(submitted.stdout.strip().splitlines()[-1])
        submit_seconds = time.perf_counter() - started
        store = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
        timeline: list[tuple[float, int, float, float]] = []
        last_scrape = 0.0
        while True:
            status, done, tokens, total = store.execute(
                "SELECT status, done_count, completion_tokens, total_requests FROM jobs WHERE id = ?", (job,)).fetchone()
            if time.perf_counter() - last_scrape >= 0.5 or status in ("completed", "failed", "cancelled"):
                last_scrape = time.perf_counter()
                scraped = [scrape_occupancy(metrics_port + i) for i in range(processes)]
                timeline.append((round(last_scrape - started, 2), done, sum(a for a, _ in scraped), sum(b for _, b in scraped)))
            if status in ("completed", "failed", "cancelled"):
                break
            if worker.poll() is not None or time.perf_counter() - started > timeout:
                raise RuntimeError(f"job {job} is {status} ({done} done):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.1)
        seconds = time.perf_counter() - started
        cpu = tree_cpu_seconds(worker.pid) - cpu
        failed = store.execute("SELECT count(*) FROM requests WHERE job_id = ? AND status = 'failed'", (job,)).fetchone()[0]
        precisions = store.execute("SELECT DISTINCT dtype, quantization FROM results WHERE job_id = ?", (job,)).fetchall()
        store.close()
    finally:
        stop.set()
        watcher.join()
        stop_group(worker, grace_s=60)
        log.close()
        # how long each queue message's task ran in the worker (Celery logs "succeeded in 17.75s: 128")
        message_seconds = [round(float(s), 2) for s in re.findall(r"bulkgen\.generate\[[^\]]+\] succeeded in ([0-9.]+)s", log_path.read_text())]
        client = redis.Redis.from_url(broker_url)
        client.flushdb()
        client.close()
    return dict(requests=done, tokens=tokens, seconds=seconds, cpu_seconds=cpu, submit_seconds=submit_seconds, failed=failed,
                status=status, precision=dtype, quantize=quantize, rss_mib=peak[0], recorded=[list(p) for p in precisions],
                message_seconds=message_seconds, processes=processes,
                occupancy=occupancy_summary(timeline, total, drain_from=total - processes * BATCH_ROWS))


def free_port_block(count: int) -> int:
    """A port p such that p .. p + count - 1 are free now (each pool process serves its metrics on p + index)."""
    import socket

    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + count >= 65536:
            continue
        try:
            sockets = []
            for offset in range(count):
                sock = socket.socket()
                sock.bind(("127.0.0.1", base + offset))
                sockets.append(sock)
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} consecutive free ports")


# --- matmul rates -----------------------------------------------------------------------------------------------


def matmul_rate(device: str, dtype_name: str, m: int, k: int, n: int, seconds: float = 1.0) -> float:
    """GFLOP/s of (m, k) @ (k, n) products on device, best of a second of repetitions."""
    import torch

    dtype = getattr(torch, dtype_name)
    a = torch.randn(m, k, dtype=dtype, device=device)
    b = torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - t) / 10)
    return 2 * m * k * n / best / 1e9


def matmul_mode() -> dict[str, Any]:
    from workers.loader import load_model
    from contract.registry import resolve

    model, _ = load_model(resolve(MODEL), "cpu", "float32")
    flop_per_token = 2 * sum(m.weight.numel() for m in model.modules() if m.__class__.__name__ == "Linear")
    config = model.config
    shapes = {"decode (64x576 @ 576x1536)": (64, config.hidden_size, config.intermediate_size), "square 2048": (2048, 2048, 2048)}
    rates = {f"{d} {name}": matmul_rate("cpu", d, *shape) for d in ("float32", "bfloat16") for name, shape in shapes.items()}
    return dict(flop_per_token=flop_per_token, gflops=rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=["naive", "static", "engine", "aodynamic", "pipeline", "fleet", "matmul"])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=None, help="Only the first N requests.")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--quantize", default="none")
    parser.add_argument("--reference", type=Path, help="The quality guard's text (JSON); written when --make-reference.")
    parser.add_argument("--make-reference", action="store_true")
    parser.add_argument("--timing-only", action="store_true", help="engine: the timed run only (no profile, no quality guard)")
    parser.add_argument("--static", action="store_true", help="engine: the static-batch path of non-Llama architectures")
    parser.add_argument("--prefix-cache-tokens", type=int, default=None, help="engine: the prefix cache's size (0: off)")
    parser.add_argument("--speculative-tokens", type=int, default=None, help="engine: most draft tokens per row and step (0: off)")
    parser.add_argument("--draft-model", default=None, help="engine: a draft model (a name --model takes) in place of prompt lookup")
    parser.add_argument("--speculate-always", action="store_true",
                        help="engine: verify every draft, whatever the policy expects (what drafting gives and costs)")
    parser.add_argument("--batch-rows", type=int, default=64, help="engine: most rows decoded together")
    parser.add_argument("--no-cascade", action="store_true",
                        help="engine: read a prefix all rows share once per row, not once per step (to measure cascade attention)")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379")
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    lines = read_lines(args.prompts)[: args.requests]
    if args.no_cascade:
        import workers.scheduler

        workers.scheduler.MIN_SHARED = 1 << 62
    if args.kind == "naive":
        result = hf_generate(lines, 1, "float32")
    elif args.kind == "static":
        result = hf_generate(lines, STATIC_BATCH, "float32")
    elif args.kind == "engine":
        result = engine_mode(lines, args.dtype, args.quantize, args.reference, args.make_reference, not args.timing_only, args.static,
                             args.prefix_cache_tokens, args.speculative_tokens, args.batch_rows, args.draft_model, args.speculate_always)
    elif args.kind == "aodynamic":
        result = aodynamic_mode(lines, args.reference)
    elif args.kind == "pipeline":
        prompts = args.prompts
        if args.requests is not None:  # the pipeline reads a file: write the first N lines to one
            prompts = Path(tempfile.mkdtemp(prefix="bulkgen-bench-")) / "prompts.jsonl"
            prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
        result = pipeline_mode(prompts, args.dtype, args.quantize, args.broker, args.timeout)
    elif args.kind == "fleet":
        # FLEET_REQUESTS requests (the workload's lines over and over, FLEET_NEW_TOKENS new tokens each) on two
        # pool processes of one thread each: occupancy across a job of many messages per worker
        many = [dict(line, max_new_tokens=FLEET_NEW_TOKENS) for line in itertools.islice(itertools.cycle(lines), FLEET_REQUESTS)]
        prompts = Path(tempfile.mkdtemp(prefix="bulkgen-bench-")) / "fleet.jsonl"
        prompts.write_text("".join(json.dumps({k: v for k, v in line.items() if k != "custom_id"}) + "\n" for line in many))
        result = pipeline_mode(prompts, args.dtype, args.quantize, args.broker, args.timeout, processes=2)
    else:
        result = matmul_mode()
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
