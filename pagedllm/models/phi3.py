"""Phi-3 and Phi-4 (``Phi3ForCausalLM``): the Llama decoder, loaded from fused checkpoints.

Phi-3 checkpoints store q/k/v as one ``qkv_proj`` and gate/up as one ``gate_up_proj``. Each is
split here into the Llama pieces, which the Llama loader then writes into its merged matrices
shard by shard, so a tensor-parallel rank takes its slice of each piece, not of the fused rows.
The rest is configuration the shared decoder reads from ``ModelArch``: longrope, the partial
rotary factor (Phi-4-mini rotates 3/4 of each head) and Phi-3-mini-4k's sliding window.

Longrope differs from transformers for sequences longer than original_max_position_embeddings:
transformers' Phi-3 recomputes the cache with the long factors once a sequence crosses it,
pagedllm keeps the short rotation below it (see ``layers.rotary``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from pagedllm.models.llama import DecoderForCausalLM


class Phi3ForCausalLM(DecoderForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        super().load_weights(self._split_fused(weights))

    def _split_fused(self, weights: Iterable[tuple[str, torch.Tensor]],
                     ) -> Iterator[tuple[str, torch.Tensor]]:
        a, inter = self.arch, self.arch.intermediate_size
        # fused name piece -> (the Llama pieces, their rows)
        fused = {".qkv_proj.": ((".q_proj.", ".k_proj.", ".v_proj."),
                                (a.q_size, a.kv_size, a.kv_size)),
                 ".gate_up_proj.": ((".gate_proj.", ".up_proj."), (inter, inter))}
        for name, tensor in weights:
            match = next((f for f in fused if f in name), None)
            if match is None:
                yield name, tensor
                continue
            pieces, rows = fused[match]
            if tensor.shape[0] != sum(rows):
                raise ValueError(f"checkpoint tensor {name!r} has {tensor.shape[0]} rows; the "
                                 f"config's {'/'.join(p.strip('.') for p in pieces)} need "
                                 f"{sum(rows)}")
            for piece, part in zip(pieces, tensor.split(rows)):
                yield name.replace(match, piece), part
