"""A reasoning model's thinking, kept apart from its answer: `reasoning_content`, as vLLM and OpenAI's output have it.

Only for models whose chat template marks thinking with <think>…</think> (Qwen3, QwQ, DeepSeek-R1 and their
distills), and only for chat requests (a plain prompt is not rendered with the template). The rule is vLLM's
reasoning parsers': the text before </think> is the reasoning (a leading <think> dropped), the text after it the
answer. Without </think>, the row never closed its thinking: when the prompt opened it (the template ends the
prompt with <think>, as DeepSeek-R1's does) or the text opens it, all of it is reasoning and the answer is empty;
otherwise all of it is the answer (the model did not think, e.g. Qwen3 with enable_thinking false).
Both parts are stripped of the whitespace around them.
"""
from __future__ import annotations

from dataclasses import replace

from transformers import PreTrainedTokenizerBase

from workers.types import Sample

OPEN, CLOSE = "<think>", "</think>"


def marks_thinking(tokenizer: PreTrainedTokenizerBase) -> bool:
    """The tokenizer's chat template closes a thinking block."""
    template = getattr(tokenizer, "chat_template", None)
    templates = template.values() if isinstance(template, dict) else [template]
    return any(isinstance(t, str) and CLOSE in t for t in templates)


def prompt_opens_thinking(rendered: str) -> bool:
    """The rendered prompt ends inside an open <think> block (the model's text starts with its thinking)."""
    return rendered.rstrip().endswith(OPEN)


def split_thinking(sample: Sample, opened: bool) -> Sample:
    """The sample with its thinking moved from text to reasoning (text keeps the answer)."""
    text = sample.text
    if CLOSE in text:
        thinking, _, answer = text.partition(CLOSE)
    elif opened or text.lstrip().startswith(OPEN):
        thinking, answer = text, ""
    else:
        return sample
    thinking = thinking.lstrip()
    thinking = thinking[len(OPEN):] if thinking.startswith(OPEN) else thinking
    return replace(sample, text=answer.strip(), reasoning=thinking.strip())
