"""Beam search: transformers' own, for requests with num_beams > 1 (they never join a continuous batch)."""
from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.finish import finish_sequence
from workers.rows import Row
from workers.types import Sample, SamplingParams


def beam_search(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt_ids: list[int],
    params: SamplingParams,
    eos_ids: frozenset[int],
    device: torch.device,
) -> list[Sample]:
    """params.n sequences from transformers' beam search, stop strings applied to them afterwards."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    output = model.generate(
        input_ids,
        attention_mask=torch.ones_like(input_ids),
        num_beams=params.num_beams,
        num_return_sequences=params.n,
        do_sample=False,
        max_new_tokens=params.max_new_tokens,
        repetition_penalty=params.repetition_penalty,
        # Unused without sampling, but given so that no generation-config default (top_k=50) can leak in.
        top_k=params.top_k,
        top_p=params.top_p,
        no_repeat_ngram_size=0,
        eos_token_id=sorted(eos_ids),
        pad_token_id=tokenizer.pad_token_id,
    )
    samples = []
    for i, sequence in enumerate(output[:, len(prompt_ids) :].tolist()):
        row = Row(None, i, prompt_ids, params, None if params.seed is None else params.seed + i)
        samples.append(finish_sequence(tokenizer, sequence, row, eos_ids))
    return samples
