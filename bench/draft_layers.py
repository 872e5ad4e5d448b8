"""A draft model for measuring draft-model speculation: some of a model's decoder layers (its first ones, or its
first and last ones, skipping the middle), with its embedding, final norm and output head (no training: a crude,
cheap guesser with exactly the same tokenizer).

SmolLM2-135M is the smallest model of its family, so no smaller model with its tokenizer exists here; its first
layers stand in for one. Run with the project's venv after `make bench-peers` (which exports .peers/smollm2-hf):
`.venv/bin/python -m bench.draft_layers --source .peers/smollm2-hf --layers 0-3,26-29 --out .peers/smollm2-skip`;
then `python -m bench.measure engine --draft-model .peers/smollm2-skip ...`.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def truncate(source: Path, layers: list[int], out: Path) -> Path:
    """Save a model made of the source's decoder layers `layers` (in that order), its embedding, norm and head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=True)
    total = model.config.num_hidden_layers
    if not layers or any(not 0 <= i < total for i in layers):
        raise SystemExit(f"draft_layers: --layers must name layers between 0 and {total - 1}")
    model.model.layers = model.model.layers.__class__([model.model.layers[i] for i in layers])
    for position, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = position
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--layers", required=True, help="which layers, as ranges: 0-5, or 0-3,26-29 (skip the middle)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    layers = [i for part in args.layers.split(",") for i in _span(part)]
    print(f"draft_layers: wrote {truncate(args.source, layers, args.out)}")


def _span(part: str) -> range:
    first, _, last = part.partition("-")
    return range(int(first), int(last or first) + 1)


if __name__ == "__main__":
    main()
