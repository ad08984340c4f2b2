"""Triton paged attention on one GPU: decode time vs the HBM roofline, and mixed prefill steps.

    python benchmarks/bench_attention.py [--fp8]

``--fp8``: instead, an FP8 cache (--kv-cache-dtype fp8) against the bf16 one on decode steps,
over a sweep of the kernel's launch settings (``AttentionTiles``), best first.

Shapes of Qwen3-0.6B (16 query heads, 8 KV heads, head_dim 128), bf16, block_size 16.
Decode launches are timed in CUDA graphs (which also proves they are capturable), each graph
cycling over disjoint KV blocks so that the bytes read exceed L2 and come from HBM.
Takes well under a minute on an H100.
"""

from __future__ import annotations

import argparse
import itertools
import math
from collections.abc import Callable

import torch
import triton
import triton.testing

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.torch_backend import paged_attention_ref
from pagedllm.attention.triton_backend import (
    AttentionPlan,
    TritonAttentionBackend,
    choose_block_m,
    choose_num_splits,
    device_num_sms,
)
from pagedllm.kernels.paged_attention import AttentionTiles, choose_tiles, paged_attention_triton

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 16, 8, 128, 16
DTYPE = torch.bfloat16
HBM_BYTES_PER_S = 3.0e12
BATCHES = [1, 4, 16, 64, 256]
CONTEXTS = [512, 2048, 8192]
SPLITS = [1, 2, 4, 8, 16]
MIN_BYTES_PER_GRAPH = 256 << 20  # > 50 MiB of L2, so reads come from HBM
SCALE = HEAD_DIM ** -0.5
DEV = torch.device("cuda")


def kv_bytes(num_tokens: int, itemsize: int = DTYPE.itemsize) -> int:
    return num_tokens * NUM_KV_HEADS * HEAD_DIM * 2 * itemsize  # keys and values


def decode_metadata(batch: int, context: int, first_block: int) -> AttentionMetadata:
    """A decode step whose requests own blocks first_block.. in a shuffled order."""
    blocks = context // BLOCK_SIZE
    ids = first_block + torch.randperm(batch * blocks, device=DEV, dtype=torch.int32)
    return AttentionMetadata(
        num_tokens=batch, slot_mapping=torch.full((batch,), -1, device=DEV),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=DEV),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=DEV),
        block_tables=ids.view(batch, blocks), max_query_len=1, max_seq_len=context,
        query_lens_cpu=[1] * batch, seq_lens_cpu=[context] * batch)


def graph_time_us(fns: list[Callable[[], object]]) -> float:
    """Mean time of one call, replaying all of ``fns`` back to back in a CUDA graph."""
    for fn in fns:
        fn()  # compile outside the capture
    torch.cuda.synchronize()
    ms = triton.testing.do_bench_cudagraph(lambda: [fn() for fn in fns], rep=15)
    return ms * 1e3 / len(fns)


def decode_table(kv_cache: torch.Tensor) -> None:
    num_blocks = kv_cache.shape[1]
    q = torch.randn(max(BATCHES), NUM_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    block_m = choose_block_m(1, triton.next_power_of_2(NUM_HEADS // NUM_KV_HEADS))
    print(f"\nDecode: {NUM_HEADS} q heads / {NUM_KV_HEADS} kv heads, head_dim {HEAD_DIM}, "
          f"bf16, block {BLOCK_SIZE}; roofline = KV bytes / {HBM_BYTES_PER_S / 1e12:.1f} TB/s")
    print(f"{'batch':>5} {'ctx':>5} {'KV MiB':>7} {'split':>5} {'auto us':>8} {'1-way us':>8} "
          f"{'best us':>8} {'(split)':>7} {'roof us':>8} {'% roof':>6} {'GB/s':>6}")
    for batch in BATCHES:
        for context in CONTEXTS:
            nbytes = kv_bytes(batch * context)
            blocks = batch * context // BLOCK_SIZE
            copies = min(math.ceil(MIN_BYTES_PER_GRAPH / nbytes), num_blocks // blocks)
            steps = [decode_metadata(batch, context, i * blocks) for i in range(copies)]
            auto = choose_num_splits(batch * NUM_KV_HEADS, context, device_num_sms(DEV))
            q_batch, times = q[:batch], {}
            for splits in sorted(set(SPLITS) | {auto}):
                times[splits] = decode_us(q_batch, kv_cache, steps, block_m, splits, None)
            best = min(times, key=times.__getitem__)
            roof = nbytes / HBM_BYTES_PER_S * 1e6
            print(f"{batch:>5} {context:>5} {nbytes / 2**20:>7.1f} {auto:>5} {times[auto]:>8.1f} "
                  f"{times[1]:>8.1f} {times[best]:>8.1f} {f'({best})':>7} {roof:>8.1f} "
                  f"{100 * roof / times[auto]:>6.1f} {nbytes / times[auto] / 1e3:>6.0f}")


def mixed_metadata(reqs: list[tuple[int, int]]) -> AttentionMetadata:
    """(query_len, seq_len) per request, each owning fresh contiguous-id blocks, shuffled."""
    width = max(math.ceil(s / BLOCK_SIZE) for _, s in reqs)
    total_blocks = len(reqs) * width
    table = torch.randperm(total_blocks, device=DEV, dtype=torch.int32).view(len(reqs), width)
    slots = []
    for r, (q_len, s_len) in enumerate(reqs):
        pos = torch.arange(s_len - q_len, s_len, device=DEV)
        slots.append(table[r, pos // BLOCK_SIZE].long() * BLOCK_SIZE + pos % BLOCK_SIZE)
    q_lens, s_lens = [q for q, _ in reqs], [s for _, s in reqs]
    starts = torch.tensor([0] + q_lens, device=DEV).cumsum(0).to(torch.int32)
    return AttentionMetadata(
        num_tokens=sum(q_lens), slot_mapping=torch.cat(slots), query_start_loc=starts,
        seq_lens=torch.tensor(s_lens, dtype=torch.int32, device=DEV), block_tables=table,
        max_query_len=max(q_lens), max_seq_len=max(s_lens), query_lens_cpu=q_lens,
        seq_lens_cpu=s_lens)


def attention_flops(reqs: list[tuple[int, int]]) -> float:
    """QK^T and PV multiply-adds over the causally visible keys."""
    visible = sum(q * (s - q) + q * (q + 1) / 2 for q, s in reqs)
    return 4 * NUM_HEADS * HEAD_DIM * visible


def mixed_check(name: str, reqs: list[tuple[int, int]]) -> None:
    md = mixed_metadata(reqs)
    blocks = md.block_tables.numel()
    kv_cache = torch.randn(2, blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    q = torch.randn(md.num_tokens, NUM_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    k, v = torch.randn(2, md.num_tokens, NUM_KV_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    backend = TritonAttentionBackend()
    backend.prepare(md, BLOCK_SIZE)
    out = backend.forward(q, k, v, kv_cache, md, SCALE)
    err = (out.float() - paged_attention_ref(q, kv_cache, md, SCALE).float()).abs().max().item()
    plan = backend.plan(md.backend_data, NUM_HEADS, NUM_KV_HEADS, DTYPE)
    ms = triton.testing.do_bench(lambda: backend.forward(q, k, v, kv_cache, md, SCALE), rep=50)
    tiles = len(reqs) if plan.tile_map is None else plan.tile_map.shape[0]
    print(f"{name:<34} tokens {md.num_tokens:>5}  BLOCK_M {plan.block_m:>3}  tiles {tiles:>4}  "
          f"split {plan.num_splits:>2}  {ms * 1e3:>8.1f} us  "
          f"{attention_flops(reqs) / ms / 1e9:>6.1f} TFLOP/s  max|err| {err:.2e} "
          f"{'OK' if err < 2e-2 else 'FAIL'}")


FP8_DECODES = [(256, 512), (256, 1024), (64, 2048), (16, 4096)]  # (batch, context)
FP8_SWEEP = [AttentionTiles(*t) for t in itertools.product((64, 128), (4, 8), (2, 3, 4),
                                                           (False, True))]


def decode_us(q: torch.Tensor, cache: torch.Tensor, steps: list[AttentionMetadata],
              block_m: int, splits: int, tiles: AttentionTiles | None) -> float:
    """One decode launch per step's metadata, replayed in a CUDA graph: us per launch (the
    scales apply to an FP8 cache only)."""
    return graph_time_us([
        lambda md=md: paged_attention_triton(
            q, cache, md.query_start_loc, md.seq_lens, md.block_tables, SCALE, block_m=block_m,
            tile_map=None, num_splits=splits, k_scale=2.0, v_scale=2.0, tiles=tiles)
        for md in steps])


def fp8_table() -> None:
    """Decode steps over a bf16 cache (default tiles) and an FP8 one (every tiling): us each."""
    block_m = choose_block_m(1, triton.next_power_of_2(NUM_HEADS // NUM_KV_HEADS))
    max_tokens = max(b * c for b, c in FP8_DECODES) * 4
    bf16 = torch.empty(2, max_tokens // BLOCK_SIZE, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                       device=DEV, dtype=DTYPE).normal_()
    fp8 = (bf16 * 0.5).to(torch.float8_e4m3fn)
    q = torch.randn(max(b for b, _ in FP8_DECODES), NUM_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
    print(f"\nFP8 cache vs bf16, decode, {NUM_HEADS}/{NUM_KV_HEADS} heads, head_dim {HEAD_DIM}: "
          "us per step (GB/s of KV read); tiles = (block_n, warps, stages, fp16_dot)")
    for batch, context in FP8_DECODES:
        blocks = batch * context // BLOCK_SIZE
        steps = [decode_metadata(batch, context, i * blocks) for i in range(4)]
        splits = choose_num_splits(batch * NUM_KV_HEADS, context, device_num_sms(DEV))

        base = decode_us(q[:batch], bf16, steps, block_m, splits, None)
        default = choose_tiles(HEAD_DIM, block_m, True, DTYPE)
        times = {t: decode_us(q[:batch], fp8, steps, block_m, splits, t) for t in FP8_SWEEP}
        ranked = sorted(times, key=times.__getitem__)
        nbytes = kv_bytes(batch * context, 1)
        print(f"batch {batch} x ctx {context} (split {splits}): bf16 {base:.1f} us "
              f"({kv_bytes(batch * context) / base / 1e3:.0f} GB/s); fp8 default "
              f"{tuple(default)} {times[default]:.1f} us ({times[default] / base:.2f}x bf16)")
        for t in ranked[:4]:
            print(f"    fp8 {tuple(t)}: {times[t]:.1f} us ({nbytes / times[t] / 1e3:.0f} GB/s, "
                  f"{times[t] / base:.2f}x bf16)")
        worst = ranked[-1]
        print(f"    worst {tuple(worst)}: {times[worst]:.1f} us")


FP8_PREFILL_SWEEP = [AttentionTiles(*t) for t in itertools.product((64, 128), (4, 8), (2, 3),
                                                                   (False, True))]


def mixed_us(q: torch.Tensor, cache: torch.Tensor, md: AttentionMetadata, plan: AttentionPlan,
             tiles: AttentionTiles | None) -> float:
    return 1e3 * triton.testing.do_bench(lambda: paged_attention_triton(
        q, cache, md.query_start_loc, md.seq_lens, md.block_tables, SCALE, block_m=plan.block_m,
        tile_map=plan.tile_map, num_splits=plan.num_splits, k_scale=2.0, v_scale=2.0,
        tiles=tiles), rep=50)


def fp8_prefill_table() -> None:
    """Mixed steps (prompt chunks over a cached prefix) over a bf16 and an FP8 cache."""
    print("\nFP8 cache vs bf16, mixed steps (the backend's block_m and tile map), us:")
    for name, reqs in [("4 chunks 1024 over 1024 + 60 decodes", [(1024, 2048)] * 4 +
                        [(1, 2048)] * 60), ("8 prompts 512, no prefix", [(512, 512)] * 8)]:
        md = mixed_metadata(reqs)
        bf16 = torch.randn(2, md.block_tables.numel(), BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                           device=DEV, dtype=DTYPE)
        fp8 = (bf16 * 0.5).to(torch.float8_e4m3fn)
        q = torch.randn(md.num_tokens, NUM_HEADS, HEAD_DIM, device=DEV, dtype=DTYPE)
        backend = TritonAttentionBackend()
        backend.prepare(md, BLOCK_SIZE)
        plan = backend.plan(md.backend_data, NUM_HEADS, NUM_KV_HEADS, DTYPE)

        base = mixed_us(q, bf16, md, plan, None)
        times = {t: mixed_us(q, fp8, md, plan, t) for t in FP8_PREFILL_SWEEP}
        default = choose_tiles(HEAD_DIM, plan.block_m, True, DTYPE)
        top = ", ".join(f"{tuple(t)} {times[t]:.0f}" for t in sorted(times, key=times.get)[:3])
        print(f"{name} (block_m {plan.block_m}): bf16 {base:.0f}; fp8 default {tuple(default)} "
              f"{times[default]:.0f} ({times[default] / base:.2f}x); best {top}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp8", action="store_true", help="the FP8 cache's sweep only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention.py needs a CUDA GPU")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    if args.fp8:
        fp8_table()
        fp8_prefill_table()
        return
    print("\nMixed steps (KV write + attention, eager, checked against paged_attention_ref):")
    mixed_check("4 chunks 1024 over 1024 + 60 decodes", [(1024, 2048)] * 4 + [(1, 2048)] * 60)
    mixed_check("1 prompt 4096, no prefix", [(4096, 4096)])
    mixed_check("decodes only, batch 8 @ 4096", [(1, 4096)] * 8)
    max_tokens = max(BATCHES) * max(CONTEXTS)
    kv_cache = torch.empty(2, max_tokens // BLOCK_SIZE, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM,
                           device=DEV, dtype=DTYPE).normal_()
    decode_table(kv_cache)


if __name__ == "__main__":
    main()
