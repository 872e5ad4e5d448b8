"""The benchmark's fixed workload and what every measurement shares: requests, token counts, perplexity, RSS."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = ROOT.parent / "shared" / "bench" / "prompts.jsonl"
MODEL = "smollm2-135m-instruct"
QUALITY_PROMPTS = 50
"""The quality guard's text: the first this many prompts answered greedily by the float32 engine."""
QUALITY_TOKENS = 128


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The workload's JSON lines, as they are (the producer validates them in the pipeline run)."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_requests(lines: list[dict[str, Any]]):  # -> list[GenerationRequest]
    """Engine requests with each line's own sampling values, resolved as the worker resolves them."""
    from workers.types import SAMPLING_FIELDS, GenerationRequest, resolve_params

    return [
        GenerationRequest(
            resolve_params({}, {k: line[k] for k in SAMPLING_FIELDS if k in line}),
            prompt=line.get("prompt"),
            messages=line.get("messages"),
        )
        for line in lines
    ]


def prompt_ids(tokenizer, request) -> list[int]:  # type: ignore[no-untyped-def]
    """The prompt's token ids exactly as the engine builds them (chat template, no extra special tokens)."""
    if request.messages is not None:
        text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    else:
        text = request.prompt
    return tokenizer(text, add_special_tokens=False).input_ids


def real_tokens(ids: list[int], eos_ids: set[int]) -> int:
    """Generated tokens up to the first end-of-sequence token (which, like padding after it, is not counted)."""
    for i, token in enumerate(ids):
        if token in eos_ids:
            return i
    return len(ids)


def perplexity(model, pairs: list[tuple[list[int], list[int]]]) -> float:  # type: ignore[no-untyped-def]
    """exp of the mean negative log-likelihood of each answer's tokens given its prompt, under model."""
    import torch

    total, count = 0.0, 0
    with torch.inference_mode():
        for prompt, answer in pairs:
            ids = torch.tensor([prompt + answer], device=model.device)
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
            target = ids[0, len(prompt) :]
            total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
            count += len(answer)
    return math.exp(total / count)


def peak_rss_mib() -> float:
    """This process's peak resident set size (model load included)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_seconds() -> float:
    """User + system CPU time of this process so far (all its threads)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _tree(pid: int, field: int) -> int:
    """The sum of one /proc/PID/stat field (0-based, after the command name) over pid and its descendants."""
    children: dict[int, list[int]] = {}
    value: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        value[int(entry)] = sum(int(fields[i]) for i in ((field,) if field >= 0 else (11, 12)))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += value.get(p, 0)
        todo.extend(children.get(p, []))
    return total


def tree_rss_mib(pid: int) -> float:
    """Resident set size of pid and all its descendants now, from /proc (0 once they are gone)."""
    return _tree(pid, 21) * os.sysconf("SC_PAGE_SIZE") / 2**20


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time so far of pid and its living descendants."""
    return _tree(pid, -1) / os.sysconf("SC_CLK_TCK")


def machine() -> dict[str, str]:
    """CPU model, core count and the SIMD flags that decide which precision is fast; the torch build."""
    import torch

    info: dict[str, str] = {}
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", out, flags=re.M))
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if re.match(r"avx|amx|fma|f16c|sse4_2", f)]
    info["cpu"] = fields.get("Model name", "unknown")
    info["cpus"] = fields.get("CPU(s)", str(os.cpu_count()))
    info["simd"] = " ".join(simd)
    info["torch"] = f"{torch.__version__}, {torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}"
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return info
