"""A draft model for measuring draft-model speculation: the first N decoder layers of a model, with its own
embedding, final norm and output head (no training: a crude, cheap guesser with exactly the same tokenizer).

SmolLM2-135M is the smallest model of its family, so no smaller model with its tokenizer exists here; its first
layers stand in for one. Run with the project's venv after `make bench-peers` (which exports .peers/smollm2-hf):
`.venv/bin/python -m bench.draft_layers --source .peers/smollm2-hf --layers 8 --out .peers/smollm2-8layers`;
then `python -m bench.measure engine --draft-model .peers/smollm2-8layers ...`.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def truncate(source: Path, layers: int, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(source, local_files_only=True)
    if not 0 < layers < config.num_hidden_layers:
        raise SystemExit(f"draft_layers: --layers must be between 1 and {config.num_hidden_layers - 1}")
    config.num_hidden_layers = layers
    # the checkpoint's later layers have no place in this config and are left out
    model = AutoModelForCausalLM.from_pretrained(source, config=config, local_files_only=True)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--layers", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(f"draft_layers: wrote {truncate(args.source, args.layers, args.out)}")


if __name__ == "__main__":
    main()
