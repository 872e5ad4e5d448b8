"""Which architectures the continuous-batching engine runs (workers.decoder.DecoderRunner), and what the runner does
differently for each: one frozen Decoder per transformers class name, in ARCHITECTURES.

The runner calls the model's own modules wherever they hold the difference, so none of this needs a field here:
biases on q/k/v (Qwen2: the Linear modules have them), the norm's style (Gemma's RMSNorm multiplies by 1 + w), the
activation (the MLP module: SiLU or GeLU-tanh), the embedding scale (Gemma's embedding module multiplies by
sqrt(hidden)), the attention scale (the attention module's `scaling`: Gemma's query_pre_attn_scalar), tied
embeddings (transformers ties the LM head) and the rope variant (the rotary module: Llama 3's scaling, YaRN,
Phi-3's LongRoPE, partial rotary through the family's own apply_rotary_pos_emb). A Decoder holds only what
changes the runner's own steps: how q/k/v are projected and normed, where the norms sit around attention and
the MLP, soft caps, which layers see a sliding window, and where the text model lives.

A new architecture of this shape is one line of ARCHITECTURES; describe() says why a model is not run here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from transformers import PretrainedConfig, PreTrainedModel


@dataclass(frozen=True)
class Decoder:
    """What one architecture's decoder layers do beyond Llama's."""

    fused_qkv: bool = False
    """One qkv_proj whose output is q, then k, then v (Phi-3), not q_proj/k_proj/v_proj."""
    qk_norm: bool = False
    """attn.q_norm and attn.k_norm, an RMSNorm over each head's dimensions, on q and k before rope (Qwen3, Gemma 3)."""
    sandwich_norms: bool = False
    """Gemma 2/3: post_attention_layernorm norms the attention's output before the residual add, and the MLP sits
    between pre_feedforward_layernorm and post_feedforward_layernorm (Llama: post_attention_layernorm is the MLP's
    input norm)."""
    windows: Literal["none", "every_layer", "layer_types"] = "none"
    """Which layers attend over a sliding window of config.sliding_window keys: none; every layer when the config
    sets one (Mistral, Phi-3); the layers config.layer_types marks "sliding_attention" (Qwen2/3 when
    use_sliding_window, Gemma 2/3's alternating layers)."""
    rope_per_layer_type: bool = False
    """The rotary module takes the layer type and gives each its own cos/sin (Gemma 3: local layers' own theta)."""
    attention_softcap: bool = False
    """Scores are soft-capped by config.attn_logit_softcapping (when set): cap * tanh(scores / cap) (Gemma 2)."""
    final_softcap: bool = False
    """Logits are soft-capped by config.final_logit_softcapping (when set), as the class's forward does."""
    text_model: str = "model"
    """Attribute path from the loaded model to its decoder stack (a multimodal checkpoint's language model)."""


GEMMA2 = Decoder(sandwich_norms=True, windows="layer_types", attention_softcap=True, final_softcap=True)
# Gemma 3's attention applies no soft cap, whatever attn_logit_softcapping says (transformers' Gemma3Attention).
GEMMA3 = Decoder(qk_norm=True, sandwich_norms=True, windows="layer_types", rope_per_layer_type=True, final_softcap=True)

ARCHITECTURES: dict[str, Decoder] = {
    "LlamaForCausalLM": Decoder(),
    "MistralForCausalLM": Decoder(windows="every_layer"),
    "Qwen2ForCausalLM": Decoder(windows="layer_types"),
    "Qwen3ForCausalLM": Decoder(qk_norm=True, windows="layer_types"),
    "Phi3ForCausalLM": Decoder(fused_qkv=True, windows="every_layer"),
    "GemmaForCausalLM": Decoder(),
    "Gemma2ForCausalLM": GEMMA2,
    "Gemma3ForCausalLM": GEMMA3,
    # The multimodal checkpoint: its language model (the vision tower is loaded, never run); its forward applies no
    # final soft cap, so neither do we.
    "Gemma3ForConditionalGeneration": Decoder(
        qk_norm=True, sandwich_norms=True, windows="layer_types", rope_per_layer_type=True, text_model="model.language_model",
    ),
}


def text_config(model: PreTrainedModel) -> PretrainedConfig:
    """The config of the model's text decoder (a multimodal checkpoint's text_config)."""
    return model.config.get_text_config()


def describe(model: PreTrainedModel) -> tuple[Decoder | None, str | None]:
    """(the model's Decoder, None) when the runner can run it, else (None, why not)."""
    name = type(model).__name__
    decoder = ARCHITECTURES.get(name)
    if decoder is None:
        return None, f"architecture {name} is not on the fast engine (it runs: {', '.join(ARCHITECTURES)})"
    config = text_config(model)
    if getattr(config, "pretraining_tp", 1) != 1:
        return None, f"architecture {name} with pretraining_tp {config.pretraining_tp} (only 1 runs on the fast engine)"
    if getattr(config, "use_bidirectional_attention", False):
        return None, f"architecture {name} with use_bidirectional_attention (the fast engine is causal only)"
    return decoder, None


def layer_windows(decoder: Decoder, config: PretrainedConfig) -> list[int | None]:
    """Each layer's sliding window (keys a query sees, itself included), None where it sees every earlier key."""
    layers = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    if decoder.windows == "none" or window is None:
        return [None] * layers
    if decoder.windows == "every_layer":
        return [window] * layers
    return [window if kind == "sliding_attention" else None for kind in config.layer_types[:layers]]


def layer_types(decoder: Decoder, config: PretrainedConfig) -> list[str]:
    """Each layer's rope kind (the rotary module's layer_type argument) when rope_per_layer_type, else ""."""
    if not decoder.rope_per_layer_type:
        return [""] * config.num_hidden_layers
    return list(config.layer_types[: config.num_hidden_layers])
