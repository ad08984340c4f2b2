"""ModelArch: the architecture numbers of a decoder, read once from an HF-style config dict.

Everything that sizes memory (the planner, KV cache sizing) and the model code read these
fields, never the raw dict, so transformers 4 and 5 config spellings are handled in one place.
Vision-language models (Qwen2-VL) add a ``VisionArch`` for the image encoder and M-RoPE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VisionArch:
    """The numbers of a Qwen2-VL style vision transformer (``vision_config``)."""

    depth: int
    embed_dim: int
    num_heads: int
    mlp_ratio: float
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    hidden_act: str
    out_hidden_size: int  # the merger's output: the language model's hidden size
    rope_theta: float

    @classmethod
    def from_hf_config(cls, vision: dict[str, Any], lm_hidden_size: int) -> VisionArch:
        return cls(
            depth=vision["depth"],
            embed_dim=vision["embed_dim"],
            num_heads=vision["num_heads"],
            mlp_ratio=float(vision.get("mlp_ratio", 4)),
            patch_size=vision.get("patch_size", 14),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
            spatial_merge_size=vision.get("spatial_merge_size", 2),
            in_channels=vision.get("in_channels", vision.get("in_chans", 3)),  # 4.x: in_chans
            hidden_act=vision.get("hidden_act", "quick_gelu"),
            out_hidden_size=vision.get("hidden_size", lm_hidden_size),
            rope_theta=float(rope_theta(vision)),
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str | None
    # M-RoPE: how the rotary half-dims split among (temporal, height, width) positions
    mrope_section: tuple[int, ...] | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision: VisionArch | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> ModelArch:
        text = config.get("text_config") or config  # multimodal configs nest the LM's numbers
        architectures = config.get("architectures") or []
        if not architectures:
            raise ValueError("model config has no 'architectures' entry")
        num_heads = text["num_attention_heads"]
        hidden = text["hidden_size"]
        model_type = config.get("model_type", "")
        eos = config.get("eos_token_id", text.get("eos_token_id"))
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        vision = config.get("vision_config")
        return cls(
            architecture=architectures[0],
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=text.get("num_key_value_heads") or num_heads,
            head_dim=text.get("head_dim") or hidden // num_heads,
            vocab_size=text["vocab_size"],
            max_position_embeddings=text.get("max_position_embeddings", 2048),
            rope_theta=float(rope_theta(text)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings",
                                                text.get("tie_word_embeddings", False))),
            qkv_bias=bool(text.get("attention_bias", model_type.startswith("qwen2"))),
            qk_norm=model_type.startswith("qwen3"),
            bos_token_id=config.get("bos_token_id", text.get("bos_token_id")),
            eos_token_ids=eos_ids,
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),
            mrope_section=mrope_section(text),
            image_token_id=config.get("image_token_id"),
            vision_start_token_id=config.get("vision_start_token_id"),
            vision=VisionArch.from_hf_config(vision, hidden) if vision else None,
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def rope_theta(config: dict[str, Any]) -> float:
    """transformers <= 4 writes ``rope_theta``; transformers 5 nests it in ``rope_parameters``."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return params["rope_theta"]
    return config.get("rope_theta", 10000.0)


def mrope_section(config: dict[str, Any]) -> tuple[int, ...] | None:
    """transformers 4 writes ``rope_scaling: {type: mrope, mrope_section}``; 5 writes it in
    ``rope_parameters``."""
    for key in ("rope_parameters", "rope_scaling"):
        section = (config.get(key) or {}).get("mrope_section")
        if section:
            return tuple(section)
    return None
