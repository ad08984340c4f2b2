"""ModelArch: the architecture numbers of a decoder, read once from an HF-style config dict.

Everything that sizes memory (the planner, KV cache sizing) and the model code read these
fields, never the raw dict, so transformers 4 and 5 config spellings are handled in one place.
Vision-language models (Qwen2-VL, Qwen2.5-VL) add a ``VisionArch`` for the image encoder and M-RoPE;
RoPE scaling (Llama 3.x, YaRN, ...) is a ``RopeScaling``. Per-layer attention (sliding windows,
Gemma's soft-caps and score scale) is read as transformers reads it, family defaults included.
Mixture-of-experts decoders (Mixtral, Qwen3-MoE) add a ``MoeArch`` for their routed experts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

# transformers' rope_type values (``ROPE_INIT_FUNCTIONS`` plus "default")
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")
# the rope parameters transformers requires for each type (the others have defaults)
_REQUIRED_ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",),
                       "longrope": ("short_factor", "long_factor"),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


@dataclass(frozen=True)
class RopeScaling:
    """How RoPE's frequencies are scaled: transformers' ``rope_type`` and the parameters its
    ``modeling_rope_utils`` reads for that type (``layers.rotary`` turns them into the table).

    ``factor`` and ``original_max_position_embeddings`` are resolved as transformers resolves
    them; ``freq_factors`` are llama.cpp's ``rope_freqs.weight`` (GGUF files only): each inverse
    frequency is divided by its factor after the type's own scaling.
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None  # llama3, yarn, longrope
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    attention_factor: float | None = None  # yarn, longrope; None: derived from factor
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn
    short_factor: tuple[float, ...] | None = None  # longrope
    long_factor: tuple[float, ...] | None = None  # longrope
    freq_factors: tuple[float, ...] | None = None

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], max_position_embeddings: int) -> RopeScaling:
        """Reads ``rope_scaling`` (transformers 4; ``type`` or ``rope_type``) or
        ``rope_parameters`` (transformers 5). Raises ValueError for a type pagedllm cannot
        apply, rather than running it as plain RoPE."""
        params = config.get("rope_scaling") or config.get("rope_parameters") or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type == "mrope":  # M-RoPE's frequencies are plain; ModelArch reads its sections
            rope_type = "default"
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"RoPE scaling type {rope_type!r} in the model config is not "
                             f"supported; pagedllm supports {', '.join(ROPE_TYPES)}.")
        missing = [k for k in _REQUIRED_ROPE_KEYS.get(rope_type, ()) if params.get(k) is None]
        if missing:
            raise ValueError(f"RoPE scaling type {rope_type!r} needs {missing} in the model "
                             "config's rope_scaling / rope_parameters.")
        # As transformers: a top-level original_max_position_embeddings (Phi-3) wins.
        original = (config.get("original_max_position_embeddings")
                    or params.get("original_max_position_embeddings") or max_position_embeddings)
        factor = params.get("factor")
        if factor is None:  # yarn and longrope derive it; the others have no factor
            factor = (max_position_embeddings / original
                      if rope_type in ("yarn", "longrope") else 1.0)
        return cls(
            rope_type=rope_type,
            factor=float(factor),
            original_max_position_embeddings=(
                int(original) if rope_type in ("llama3", "yarn", "longrope") else None),
            low_freq_factor=float(params.get("low_freq_factor", 1.0)),
            high_freq_factor=float(params.get("high_freq_factor", 4.0)),
            attention_factor=_optional_float(params.get("attention_factor")),
            # transformers: a missing or zero beta takes the default
            beta_fast=float(params.get("beta_fast") or 32.0),
            beta_slow=float(params.get("beta_slow") or 1.0),
            mscale=_optional_float(params.get("mscale")),
            mscale_all_dim=_optional_float(params.get("mscale_all_dim")),
            truncate=bool(params.get("truncate", True)),
            short_factor=_optional_floats(params.get("short_factor")),
            long_factor=_optional_floats(params.get("long_factor")),
            freq_factors=_optional_floats(params.get("freq_factors")),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _optional_floats(values: Any) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


@dataclass(frozen=True)
class VisionArch:
    """The numbers of a Qwen2-VL style vision transformer (``vision_config``).

    Qwen2.5-VL's tower (``family`` "qwen2_5_vl", told apart by its ``fullatt_block_indexes``)
    has RMSNorms, a gated MLP of ``intermediate_size`` and window attention in every block but
    the listed ones; its config names the tower's width ``hidden_size`` and the merger's output
    ``out_hidden_size`` (Qwen2-VL: ``embed_dim`` and ``hidden_size``).
    """

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
    family: str = "qwen2_vl"  # or "qwen2_5_vl"
    intermediate_size: int = 0  # the MLP's width; 0: embed_dim x mlp_ratio (Qwen2-VL)
    window_size: int = 0  # attention windows' side in pixels; 0: no windows (Qwen2-VL)
    fullatt_block_indexes: tuple[int, ...] = ()  # the blocks that attend over whole frames

    @classmethod
    def from_hf_config(cls, vision: dict[str, Any], lm_hidden_size: int) -> VisionArch:
        if "fullatt_block_indexes" in vision:
            return cls._from_qwen2_5_vl(vision, lm_hidden_size)
        return cls(
            depth=vision["depth"],
            embed_dim=vision["embed_dim"],
            mlp_ratio=float(vision.get("mlp_ratio", 4)),
            hidden_act=vision.get("hidden_act", "quick_gelu"),
            out_hidden_size=vision.get("hidden_size", lm_hidden_size),
            **_vision_common(vision),
        )

    @classmethod
    def _from_qwen2_5_vl(cls, vision: dict[str, Any], lm_hidden_size: int) -> VisionArch:
        embed_dim = vision["hidden_size"]
        intermediate = vision["intermediate_size"]
        return cls(
            depth=vision["depth"],
            embed_dim=embed_dim,
            mlp_ratio=intermediate / embed_dim,
            hidden_act=vision.get("hidden_act", "silu"),
            out_hidden_size=vision.get("out_hidden_size", lm_hidden_size),
            family="qwen2_5_vl",
            intermediate_size=intermediate,
            window_size=vision.get("window_size", 112),
            fullatt_block_indexes=tuple(vision["fullatt_block_indexes"]),
            **_vision_common(vision),
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size or int(self.embed_dim * self.mlp_ratio)


def _vision_common(vision: dict[str, Any]) -> dict[str, Any]:
    """The VisionArch fields both Qwen2-VL and Qwen2.5-VL write alike."""
    return dict(
        num_heads=vision["num_heads"],
        patch_size=vision.get("patch_size", 14),
        temporal_patch_size=vision.get("temporal_patch_size", 2),
        spatial_merge_size=vision.get("spatial_merge_size", 2),
        in_channels=vision.get("in_channels", vision.get("in_chans", 3)),  # 4.x: in_chans
        rope_theta=float(rope_theta(vision)),
    )


@dataclass(frozen=True)
class MoeArch:
    """The routed experts of a sparse decoder, read as transformers' Mixtral and Qwen3-MoE read
    them: softmax over the router logits in float32, then the top ``top_k`` experts."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's (the dense layers keep ModelArch.intermediate_size)
    # top-k weights divided by their sum: always in Mixtral, ``norm_topk_prob`` in Qwen3-MoE
    renormalize: bool
    # Qwen3-MoE rounds the top-k weights to the model dtype before they scale the experts'
    # outputs; Mixtral multiplies in float32 and rounds the product
    round_weights: bool
    # which layers are sparse; the others run the dense MLP (Qwen3-MoE's mlp_only_layers)
    sparse_layers: tuple[bool, ...]

    @classmethod
    def from_hf_config(cls, config: dict[str, Any], model_type: str) -> MoeArch | None:
        """None for a dense config. Qwen3-MoE writes ``num_experts`` (transformers 5 saves it as
        ``num_local_experts``, Mixtral's name); a layer is sparse unless listed in
        ``mlp_only_layers`` or skipped by ``decoder_sparse_step``."""
        num_experts = config.get("num_local_experts") or config.get("num_experts") or 0
        if not num_experts:
            return None
        mixtral = model_type.startswith("mixtral")
        dense = set(config.get("mlp_only_layers") or ())
        step = config.get("decoder_sparse_step") or 1
        return cls(
            num_experts=num_experts,
            top_k=config["num_experts_per_tok"],
            intermediate_size=(config.get("moe_intermediate_size")
                               or config["intermediate_size"]),
            renormalize=mixtral or bool(config.get("norm_topk_prob", False)),
            round_weights=not mixtral,
            sparse_layers=tuple(i not in dense and (i + 1) % step == 0
                                for i in range(config["num_hidden_layers"])),
        )


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
    rope_scaling: RopeScaling = RopeScaling()
    # M-RoPE: how the rotary half-dims split among (temporal, height, width) positions
    mrope_section: tuple[int, ...] | None = None
    image_token_id: int | None = None
    vision_start_token_id: int | None = None
    vision: VisionArch | None = None
    # per layer, the sliding window of its attention: a query at p sees keys in (p - w, p];
    # 0 = full attention. Empty only for an arch built by hand (read as all full).
    sliding_windows: tuple[int, ...] = ()
    rotary_dim: int = 0  # leading dims of a head RoPE rotates (Phi-4-mini: 3/4 of it); 0: all
    hidden_act: str = "silu"  # the gated MLP's activation
    query_pre_attn_scalar: float | None = None  # Gemma: scores scale by its -1/2, not head_dim's
    attn_logit_softcap: float = 0.0  # Gemma 2: scores capped to c * tanh(s / c); 0 = none
    final_logit_softcap: float = 0.0  # Gemma 2: the same on the output logits
    # Gemma 3: the sliding layers' RoPE (its own base, no scaling); None: as the full layers'
    local_rope_theta: float | None = None
    local_rope_scaling: RopeScaling = RopeScaling()
    moe: MoeArch | None = None  # routed experts (Mixtral, Qwen3-MoE); None: dense MLPs

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
        max_positions = text.get("max_position_embeddings", 2048)
        head_dim = text.get("head_dim") or hidden // num_heads
        rope, local_rope = rope_by_layer_type(text)
        if text.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention (an embedding model's non-causal "
                             "attention) is not supported: pagedllm generates causally.")
        return cls(
            architecture=architectures[0],
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=text["intermediate_size"],
            num_layers=text["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=text.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            vocab_size=text["vocab_size"],
            max_position_embeddings=max_positions,
            rope_theta=float(rope_theta(rope)),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=tie_word_embeddings(config),
            qkv_bias=bool(text.get("attention_bias", model_type.startswith("qwen2"))),
            qk_norm=model_type.startswith(("qwen3", "gemma3")),
            bos_token_id=config.get("bos_token_id", text.get("bos_token_id")),
            eos_token_ids=eos_ids,
            torch_dtype=config.get("torch_dtype") or config.get("dtype"),
            rope_scaling=RopeScaling.from_hf_config(rope, max_positions),
            mrope_section=mrope_section(text),
            image_token_id=config.get("image_token_id"),
            vision_start_token_id=config.get("vision_start_token_id"),
            vision=VisionArch.from_hf_config(vision, hidden) if vision else None,
            sliding_windows=sliding_windows(text, model_type),
            rotary_dim=rotary_dim(text, head_dim),
            hidden_act=text.get("hidden_activation") or text.get("hidden_act") or "silu",
            query_pre_attn_scalar=_optional_float(text.get("query_pre_attn_scalar")),
            attn_logit_softcap=float(text.get("attn_logit_softcapping") or 0.0),
            final_logit_softcap=float(text.get("final_logit_softcapping") or 0.0),
            local_rope_theta=float(rope_theta(local_rope)) if local_rope else None,
            local_rope_scaling=(RopeScaling.from_hf_config(local_rope, max_positions)
                                if local_rope else RopeScaling()),
            moe=MoeArch.from_hf_config(text, model_type),
        )

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def kv_heads_per_rank(self, tp_size: int) -> int:
        """The KV heads each of ``tp_size`` ranks holds (one, replicated, when there are more
        ranks than heads)."""
        return max(1, self.num_kv_heads // tp_size)

    def rank_view(self, tp_size: int) -> ModelArch:
        """The numbers one of ``tp_size`` ranks computes with: its query and KV heads and its
        slice of the MLP (what sizes a rank's KV cache and activations)."""
        if tp_size == 1:
            return self
        moe = self.moe and replace(self.moe,
                                   intermediate_size=self.moe.intermediate_size // tp_size)
        return replace(self, num_heads=self.num_heads // tp_size,
                       num_kv_heads=self.kv_heads_per_rank(tp_size),
                       intermediate_size=self.intermediate_size // tp_size, moe=moe)

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raises ValueError, naming the number, if the layers cannot split over ``tp_size``
        ranks (the vocabulary always can: it is padded)."""
        splits = {"attention heads (num_attention_heads)": self.num_heads,
                  "MLP width (intermediate_size)": self.intermediate_size}
        if self.moe is not None:
            splits["experts' width (moe_intermediate_size)"] = self.moe.intermediate_size
        for what, n in splits.items():
            if n % tp_size:
                raise ValueError(f"Total number of {what} ({n}) must be divisible by tensor "
                                 f"parallel size ({tp_size}).")
        kv = self.num_kv_heads
        if kv % tp_size and tp_size % kv:
            raise ValueError(f"Total number of key-value heads ({kv}) must be divisible by, or "
                             f"divide, tensor parallel size ({tp_size}).")

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def sliding_window(self, layer_idx: int) -> int:
        """The window of layer ``layer_idx``'s attention; 0 = full attention."""
        return self.sliding_windows[layer_idx] if self.sliding_windows else 0

    def is_sparse(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx``'s MLP is routed experts rather than one dense MLP."""
        return self.moe is not None and self.moe.sparse_layers[layer_idx]


# Families whose checkpoints tie the output projection to the embeddings unless told otherwise
# (transformers' config defaults; Gemma 2's published configs do not write the key).
_TIED_BY_DEFAULT = ("gemma",)
# Families whose window applies only with use_sliding_window (default false).
_WINDOW_FLAG_FAMILIES = ("qwen",)
# Families whose modeling code reads layer_types; the others slide on every layer.
_LAYER_TYPE_FAMILIES = ("gemma2", "gemma3", "qwen")
_EVERY_LAYER_FAMILIES = ("mistral", "mixtral", "phi3")


def tie_word_embeddings(config: dict[str, Any]) -> bool:
    text = config.get("text_config") or config
    default = str(config.get("model_type", "")).startswith(_TIED_BY_DEFAULT)
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", default)))


def sliding_windows(config: dict[str, Any], model_type: str) -> tuple[int, ...]:
    """Each layer's window as transformers applies it. Gemma 2/3 and Qwen list ``layer_types``
    (or follow their rule: Gemma 2 every other layer from the first, Gemma 3 all but every
    ``sliding_window_pattern``-th, Qwen from ``max_window_layers`` on if
    ``use_sliding_window``); Mistral and Phi-3 slide on every layer; other families (Llama)
    have no window whatever the config says. A window as long as the model's positions (Phi-4's
    262144) is kept: it hides nothing, and which layers slide also picks Gemma 3's RoPE."""
    num_layers = config["num_hidden_layers"]
    window = config.get("sliding_window") or 0
    if model_type.startswith(_WINDOW_FLAG_FAMILIES) and not config.get("use_sliding_window"):
        window = 0
    if not model_type.startswith(_LAYER_TYPE_FAMILIES + _EVERY_LAYER_FAMILIES):
        window = 0
    if not window:
        return (0,) * num_layers
    types = config.get("layer_types") if model_type.startswith(_LAYER_TYPE_FAMILIES) else None
    if types is None:
        types = [_default_layer_type(config, model_type, i) for i in range(num_layers)]
    if len(types) != num_layers:
        raise ValueError(f"layer_types has {len(types)} entries for {num_layers} layers")
    return tuple(window if t == "sliding_attention" else 0 for t in types)


def _default_layer_type(config: dict[str, Any], model_type: str, i: int) -> str:
    if model_type.startswith("gemma2"):
        sliding = i % 2 == 0
    elif model_type.startswith("gemma3"):
        sliding = (i + 1) % config.get("sliding_window_pattern", 6) != 0
    elif model_type.startswith(_WINDOW_FLAG_FAMILIES):
        sliding = i >= config.get("max_window_layers", 28)  # transformers' default
    else:
        sliding = True
    return "sliding_attention" if sliding else "full_attention"


def rotary_dim(config: dict[str, Any], head_dim: int) -> int:
    """``partial_rotary_factor`` (transformers 5: in ``rope_parameters``) x head_dim."""
    params = config.get("rope_scaling") or config.get("rope_parameters") or {}
    factor = params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0))
    dim = int(head_dim * factor)
    if dim % 2 or not 0 < dim <= head_dim:
        raise ValueError(f"partial_rotary_factor={factor} gives {dim} rotary dims of a "
                         f"{head_dim}-dim head; pagedllm needs an even count.")
    return dim


def rope_theta(config: dict[str, Any]) -> float:
    """transformers <= 4 writes ``rope_theta``; transformers 5 nests it in ``rope_parameters``."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return params["rope_theta"]
    return config.get("rope_theta", 10000.0)


def rope_by_layer_type(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(the full-attention layers' RoPE config, the sliding layers' own or None), each a config
    that ``rope_theta`` and ``RopeScaling.from_hf_config`` read. Gemma 3 gives its sliding layers
    another base: transformers 5 nests ``rope_parameters`` by layer type, 4 writes
    ``rope_local_base_freq`` beside the full layers' ``rope_theta`` / ``rope_scaling``."""
    nested = config.get("rope_parameters") or {}
    if "full_attention" in nested:
        def view(layer_type: str) -> dict[str, Any]:
            return {**config, "rope_scaling": None, "rope_parameters": nested.get(layer_type)}

        local = view("sliding_attention") if nested.get("sliding_attention") else None
        return view("full_attention"), local
    if config.get("rope_local_base_freq") is not None:
        return config, {"rope_theta": config["rope_local_base_freq"]}
    return config, None


def mrope_section(config: dict[str, Any]) -> tuple[int, ...] | None:
    """transformers 4 writes ``rope_scaling: {type: mrope, mrope_section}``; 5 writes it in
    ``rope_parameters``."""
    for key in ("rope_parameters", "rope_scaling"):
        section = (config.get(key) or {}).get("mrope_section")
        if section:
            return tuple(section)
    return None
