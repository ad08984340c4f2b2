"""Gemma 3 text (``Gemma3ForCausalLM``): Gemma 2's decoder with what Gemma 3 changes.

- q and k are RMS-normed per head (Gemma's ``1 + weight`` norm) before RoPE: ``ModelArch``
  sets ``qk_norm`` and Gemma 2's layer builds the norms with its own norm class;
- the sliding layers rotate with their own RoPE (``rope_local_base_freq``, no scaling), the
  full layers with ``rope_theta`` and the config's scaling;
- five sliding layers to one full one by default (``sliding_window_pattern``), read by
  ``ModelArch``; no soft-caps in the published configs.

The multimodal ``Gemma3ForConditionalGeneration`` (4B and up) is not supported.
"""

from __future__ import annotations

import torch

from pagedllm.layers.rotary import RotaryEmbedding
from pagedllm.models.arch import ModelArch
from pagedllm.models.gemma2 import Gemma2ForCausalLM, Gemma2Model


class Gemma3Model(Gemma2Model):
    def __init__(self, arch: ModelArch) -> None:
        super().__init__(arch)
        self.local_rotary = RotaryEmbedding(
            arch.rotary_dim or arch.head_dim, arch.max_position_embeddings,
            arch.local_rope_theta or arch.rope_theta, arch.local_rope_scaling)
        self.sliding = [arch.sliding_window(i) > 0 for i in range(arch.num_layers)]

    def rotary_tables(self, positions: torch.Tensor, dtype: torch.dtype,
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        full, local = self.rotary(positions, dtype), self.local_rotary(positions, dtype)
        return [local if sliding else full for sliding in self.sliding]


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    model_class = Gemma3Model
