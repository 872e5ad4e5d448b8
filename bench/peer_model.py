"""Export the bundled SmolLM2-135M-Instruct as a Hugging Face model directory, for the peer benchmarks.

Why it exists: vLLM's CPU build (bench/peer_vllm.py, in its own venv .venv-peers) needs a transformers model
directory, not our GGUF. This loads the GGUF exactly as the workers do (workers.loader.load_model, dense float32
weights) and saves model, tokenizer and chat template, so the peer runs the same weights and renders the same
ChatML prompt as our engine.

transformers 5.24 refuses to save a model loaded from GGUF ("quantized with gguf and is not serializable")
although its weights are already dense: the quantizer and its config are dropped before save_pretrained.

Run with the project's venv: `.venv/bin/python -m bench.peer_model --out .peers/smollm2-hf` (`make bench-peers`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

from workers.loader import load_model
from contract.registry import SMOLLM2, resolve


def export(out: Path, model_name: str = SMOLLM2) -> Path:
    """Save model_name's model and tokenizer (with its chat template) to out, atomically; return out."""
    model, tokenizer = load_model(resolve(model_name), "cpu", "float32")
    template = tokenizer.chat_template
    if not template:
        raise SystemExit(f"peer_model: {model_name!r} has no chat template; vLLM's llm.chat would not render ChatML")

    # The weights are dense float32 already (load_model de-quantizes); only the bookkeeping says "gguf".
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # The engine's tokenizer pads on the left for batching; a saved directory should carry the default.
    tokenizer.padding_side = "right"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        # tokenizer_config.json may or may not hold the template, depending on the transformers version:
        # write it as a file of its own too, which every recent transformers (and vLLM) reads.
        (tmp / "chat_template.jinja").write_text(template, encoding="utf-8")
        _check(tmp, template)
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp made it private
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check(folder: Path, template: str) -> None:
    """The saved directory loads as a tokenizer with the same chat template, and has no quantization config."""
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    if "quantization_config" in config:
        raise SystemExit(f"peer_model: {folder / 'config.json'} still has a quantization_config")
    saved = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if saved.chat_template != template:
        raise SystemExit(f"peer_model: the tokenizer saved in {folder} lost its chat template")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write (replaced if it exists)")
    parser.add_argument("--model", default=SMOLLM2, help=f"model name as workers take it (default {SMOLLM2})")
    args = parser.parse_args(argv)
    out = export(args.out, args.model)
    print(f"peer_model: wrote {out}")


if __name__ == "__main__":
    main()
