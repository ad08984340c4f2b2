"""Engine configuration: vLLM's limit checks, defaults, and the CLI flags generated from fields."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from pagedllm.config import (
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
    add_engine_args,
    engine_kwargs_from_args,
)


def parse(argv: list[str]) -> dict[str, object]:
    parser = add_engine_args(argparse.ArgumentParser())
    return engine_kwargs_from_args(parser.parse_args(argv))


# -- defaults ------------------------------------------------------------------------------


def test_defaults_follow_the_model() -> None:
    config = EngineConfig.create(4096)
    assert config.model.max_model_len == 4096
    assert config.scheduler.max_model_len == 4096
    assert config.scheduler.max_num_seqs == 256
    assert config.scheduler.enable_chunked_prefill is True
    assert config.scheduler.max_num_batched_tokens == 2048
    assert config.cache.block_size == 16
    assert config.cache.enable_prefix_caching is True


def test_default_budget_with_chunked_prefill_is_2048() -> None:
    assert EngineConfig.create(32768).scheduler.max_num_batched_tokens == 2048
    assert EngineConfig.create(512).scheduler.max_num_batched_tokens == 2048
    # Never below max_num_seqs, which would be an invalid config.
    config = EngineConfig.create(512, max_num_seqs=4096)
    assert config.scheduler.max_num_batched_tokens == 4096


@pytest.mark.parametrize(("max_model_len", "max_num_seqs", "expected"),
                         [(4096, 256, 4096), (100, 256, 256), (8192, 8, 8192)])
def test_default_budget_without_chunked_prefill(max_model_len: int, max_num_seqs: int,
                                                expected: int) -> None:
    config = EngineConfig.create(max_model_len, enable_chunked_prefill=False,
                                 max_num_seqs=max_num_seqs)
    assert config.scheduler.max_num_batched_tokens == expected  # max(max_model_len, seqs)


def test_user_max_model_len_below_the_models_is_kept() -> None:
    config = EngineConfig.create(4096, max_model_len=1024)
    assert config.model.max_model_len == config.scheduler.max_model_len == 1024


def test_none_means_default() -> None:
    assert EngineConfig.create(2048, max_num_seqs=None, max_model_len=None,
                               block_size=None) == EngineConfig.create(2048)


def test_config_is_frozen() -> None:
    config = EngineConfig.create(2048)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scheduler.max_num_seqs = 1  # type: ignore[misc]


# -- limits (vLLM's messages) --------------------------------------------------------------


def test_budget_below_max_model_len_without_chunked_prefill_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(1024\) is smaller than "
                                         r"max_model_len \(4096\)"):
        EngineConfig.create(4096, enable_chunked_prefill=False, max_num_batched_tokens=1024)
    # With chunked prefill, long prompts are split to fit: fine.
    config = EngineConfig.create(4096, max_num_batched_tokens=1024)
    assert config.scheduler.max_num_batched_tokens == 1024


def test_budget_below_max_num_seqs_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(128\) must be greater than "
                                         r"or equal to max_num_seqs \(256\)"):
        EngineConfig.create(4096, max_num_batched_tokens=128)
    assert EngineConfig.create(4096, max_num_batched_tokens=256).scheduler.max_num_seqs == 256


def test_max_model_len_above_the_models_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"max_model_len \(8192\) is greater than the derived "
                                         r"max_model_len \(max_position_embeddings=4096"):
        EngineConfig.create(4096, max_model_len=8192)


def test_negative_max_model_len_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_model_len must be >= 1, got -1"):
        EngineConfig.create(4096, max_model_len=-1)


def test_zero_max_model_len_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_model_len must be >= 1, got 0"):
        EngineConfig.create(4096, max_model_len=0)


def test_unknown_argument_is_a_type_error() -> None:
    with pytest.raises(TypeError, match=r"unknown engine argument\(s\): \['max_num_seq'\]"):
        EngineConfig.create(4096, max_num_seq=8)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"max_num_seqs": 0}, "max_num_seqs must be >= 1, got 0"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be >= 1, got 0"),
])
def test_scheduler_config_bounds(kwargs: dict[str, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(**kwargs)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"block_size": 0}, "block_size must be >= 1, got 0"),
    ({"gpu_memory_utilization": 0.0}, r"gpu_memory_utilization must be in \(0, 1\]"),
    ({"gpu_memory_utilization": 1.5}, r"gpu_memory_utilization must be in \(0, 1\]"),
    ({"kv_cache_memory_bytes": 0}, "kv_cache_memory_bytes must be positive"),
])
def test_cache_config_bounds(kwargs: dict[str, float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CacheConfig(**kwargs)  # type: ignore[arg-type]


# -- CLI flags -----------------------------------------------------------------------------


def test_flags_are_spelled_like_vllms() -> None:
    parser = add_engine_args(argparse.ArgumentParser())
    flags = {o for a in parser._actions for o in a.option_strings}
    for flag in ("--max-num-seqs", "--max-num-batched-tokens", "--max-model-len",
                 "--enable-chunked-prefill", "--no-enable-chunked-prefill",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--block-size",
                 "--gpu-memory-utilization", "--kv-cache-memory-bytes", "--dtype",
                 "--load-format", "--seed", "--served-model-name", "--chat-template",
                 "--max-logprobs", "--device", "--enforce-eager", "--model"):
        assert flag in flags, flag
    # SchedulerConfig.max_model_len is not a flag of its own: --max-model-len sets both.
    assert sum(a.dest == "max_model_len" for a in parser._actions) == 1


def test_no_flags_means_no_kwargs() -> None:
    assert parse([]) == {}


def test_flags_round_trip_into_the_config() -> None:
    kwargs = parse(["--max-num-seqs", "8", "--max-num-batched-tokens", "1024",
                    "--max-model-len", "512", "--no-enable-prefix-caching",
                    "--no-enable-chunked-prefill", "--block-size", "32",
                    "--gpu-memory-utilization", "0.5", "--dtype", "float32",
                    "--load-format", "dummy", "--enforce-eager", "--seed", "3"])
    assert kwargs == {
        "max_num_seqs": 8, "max_num_batched_tokens": 1024, "max_model_len": 512,
        "enable_prefix_caching": False, "enable_chunked_prefill": False, "block_size": 32,
        "gpu_memory_utilization": 0.5, "dtype": "float32", "load_format": "dummy",
        "enforce_eager": True, "seed": 3,
    }
    config = EngineConfig.create(2048, **kwargs)
    assert config.scheduler == SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024,
                                               enable_chunked_prefill=False, max_model_len=512)
    assert config.cache.enable_prefix_caching is False
    assert config.cache.block_size == 32
    assert config.cache.gpu_memory_utilization == 0.5
    assert config.model.dtype == "float32" and config.model.seed == 3
    assert config.device.enforce_eager is True


def test_positive_bool_flags() -> None:
    assert parse(["--enable-prefix-caching", "--enable-chunked-prefill"]) == {
        "enable_prefix_caching": True, "enable_chunked_prefill": True}


def test_model_positional_or_flag() -> None:
    assert parse(["some/model"]) == {"model": "some/model"}
    assert parse(["--model", "other/model"]) == {"model": "other/model"}
    assert parse(["some/model", "--model", "other/model"]) == {"model": "other/model"}


def test_bad_flag_values_are_refused_by_the_parser() -> None:
    parser = add_engine_args(argparse.ArgumentParser())
    for argv in (["--dtype", "int8"], ["--max-num-seqs", "many"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_cli_limits_are_checked_like_kwargs() -> None:
    kwargs = parse(["--no-enable-chunked-prefill", "--max-num-batched-tokens", "100"])
    with pytest.raises(ValueError, match=r"max_num_batched_tokens \(100\) is smaller than "
                                         r"max_model_len \(2048\)"):
        EngineConfig.create(2048, **kwargs)
