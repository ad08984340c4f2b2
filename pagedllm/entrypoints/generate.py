"""``pagedllm generate "prompt"``: complete one prompt on the command line and print the text."""

from __future__ import annotations

import argparse

from pagedllm.config import add_engine_args, engine_kwargs_from_args


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="The prompt to complete.")
    parser.add_argument("--chat", action="store_true",
                        help="Wrap the prompt as one user message with the chat template.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None,
                        help="Seed of this request's sampling.")
    add_engine_args(parser)


def main(args: argparse.Namespace) -> int:
    from pagedllm import LLM, SamplingParams

    llm = LLM(**engine_kwargs_from_args(args))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=False)
    else:
        out = llm.generate(args.prompt, params, use_tqdm=False)
    print(out[0].outputs[0].text)
    return 0
