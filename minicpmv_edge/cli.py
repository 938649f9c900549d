"""`minicpmv-edge` command: a dispatcher only.

Each subcommand lives in its own module with a `main(argv) -> int`; nothing heavy is imported until
the chosen subcommand runs, so `run`/`chat`/`serve` never load torch.
"""
from __future__ import annotations

import importlib
import sys

from minicpmv_edge.errors import MiniCPMVEdgeError, MissingExtraError

# name -> ("module" or "module:function", one-line help, extra the module needs); the function defaults to main
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "synth": ("minicpmv_edge.export.synth", "write a synthetic MiniCPM-V checkpoint (tiny, edge-4b, full)", "export"),
    "export": ("minicpmv_edge.workflows.pipeline", "export a checkpoint: LLM GGUF ladder + llama.cpp mmproj", "export"),
    "inspect": ("minicpmv_edge.export.checkpoint", "read and validate a checkpoint directory, print a summary", None),
    "verify": ("minicpmv_edge.export.bundle", "re-check a bundle's files (sizes, sha256) and, optionally, parity", None),
    "run": ("minicpmv_edge.runtime.cli:run_main", "ask one question about images (streams the answer)", None),
    "chat": ("minicpmv_edge.runtime.cli:chat_main", "interactive chat with a bundle", None),
    "serve": ("minicpmv_edge.runtime.cli:serve_main", "OpenAI-compatible local HTTP server", "serve"),
    "bench": ("minicpmv_edge.workflows.benchmark", "TTFT stages and decode speed vs llama.cpp's own path", None),
    "imatrix": ("minicpmv_edge.workflows.imatrix", "importance matrix from image+text prompts, for the quantizer",
                None),
    "sweep": ("minicpmv_edge.workflows.sweep", "quantization size sweep: size, KLD, top-1, TTFT per cell", "export"),
    "demo": ("minicpmv_edge.workflows.demo", "synthesize a tiny model, export it, ask about a generated image", "export"),
}

_EXTRA_MODULES = {"torch", "transformers", "tokenizers", "safetensors", "onnx", "onnxscript", "coremltools",
                  "fastapi", "uvicorn", "av"}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: minicpmv-edge COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_, _) in COMMANDS.items()]
    lines += ["", "Run `minicpmv-edge COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from minicpmv_edge import __version__
        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"minicpmv-edge: unknown command '{name}'\n\n{_usage()}", file=sys.stderr)
        return 2
    target, _, extra = COMMANDS[name]
    module_name, _, func = target.partition(":")
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.split(".")[0] in _EXTRA_MODULES:
                raise MissingExtraError(extra or "export", exc.name) from None
            raise
        return int(getattr(module, func or "main")(rest) or 0)
    except MiniCPMVEdgeError as exc:
        print(f"minicpmv-edge {name}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"minicpmv-edge {name}: interrupted", file=sys.stderr)
        return 130
