"""The ``pagedllm`` command: serve | generate | bench {serve,throughput,sweep} | plan.

Each subcommand's module provides ``add_cli_args(parser)`` and ``main(args) -> int``; they are
imported only when their subcommand runs, so ``pagedllm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

_COMMANDS = {
    "serve": ("pagedllm.entrypoints.openai.api_server",
              "Start the OpenAI-compatible HTTP server."),
    "generate": ("pagedllm.entrypoints.generate", "Complete one prompt and print the text."),
    "plan": ("pagedllm.entrypoints.plan",
             "Plan memory (weights, activations, KV cache) and batching before launch."),
}
_BENCH = {
    "serve": ("pagedllm.benchmarks.serve", "Load-test an OpenAI-compatible server."),
    "throughput": ("pagedllm.benchmarks.throughput", "Offline throughput through LLM.generate."),
    "sweep": ("pagedllm.benchmarks.sweep",
              "Run bench serve over several concurrencies/rates and plot the curves."),
}


def _global_flags() -> argparse.ArgumentParser:
    """Flags accepted before or after the subcommand."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--log-level", default=argparse.SUPPRESS,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def _add(subparsers: argparse._SubParsersAction, name: str, module: str, help_text: str,
         argv: list[str], depth: int) -> None:
    parser = subparsers.add_parser(name, help=help_text, description=help_text,
                                   parents=[_global_flags()])
    parser.set_defaults(_module=module)
    # Only the chosen subcommand's module is imported (to add its flags).
    if len(argv) > depth and argv[depth] == name:
        importlib.import_module(module).add_cli_args(parser)


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description=__doc__,
                                     parents=[_global_flags()])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in _COMMANDS.items():
        _add(sub, name, module, help_text, argv, 0)
    bench = sub.add_parser("bench", help="Benchmarks.").add_subparsers(dest="bench", required=True)
    for name, (module, help_text) in _BENCH.items():
        _add(bench, name, module, help_text, argv, 1)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_strip_globals(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(args, "log_level", "INFO"),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    return int(importlib.import_module(args._module).main(args) or 0)


def _strip_globals(argv: list[str]) -> list[str]:
    """argv without the global flags, so argv[0] is the subcommand."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--log-level":
            skip = True
            continue
        if not a.startswith("--log-level="):
            out.append(a)
    return out


if __name__ == "__main__":
    sys.exit(main())
