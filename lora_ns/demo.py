"""``python -m lora_ns.demo --adapter OUT_DIR``: chat with a trained model in the browser (gradio).

gradio is an optional extra (``pip install 'lora_ns[demo]'``); without it this command says so in one
line and exits 2 before loading anything. The model is loaded the way `lora_ns.infer` loads it (an
adapter dir, a merged dir or a base model) and prompts are rendered as in training. A seq_cls model
gets a classifier page instead of a chat: it shows the label and the class probabilities.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_ns.errors import Problem, UserError, run_cli

PROG = "lora_ns.demo"
INSTALL_HINT = "install the demo extra: pip install 'lora_ns[demo]' (or: pip install gradio)"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lora_ns.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="a training output dir (adapter), a merged dir, or a base model")
    parser.add_argument("--base", help="base model for the adapter (default: the one in adapter_config.json)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0 to share on the LAN)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask gradio for a public share link")
    return parser


def import_gradio():
    """gradio, or a one-line `UserError` saying how to install it."""
    try:
        import gradio
    except ImportError:
        raise UserError(Problem("<command line>", "", "gradio is not installed", INSTALL_HINT))
    return gradio


def history_messages(history: list[Any]) -> list[dict[str, str]]:
    """Chat history as role/content messages, from gradio's "messages" format or its older (user, bot) pairs."""
    messages: list[dict[str, str]] = []
    for item in history or []:
        if isinstance(item, dict):
            content = item.get("content")
            if isinstance(content, str):  # skip files/components, which a text model cannot read
                messages.append({"role": item["role"], "content": content})
        else:
            user, bot = item
            messages += [{"role": "user", "content": str(user)}, {"role": "assistant", "content": str(bot or "")}]
    return messages


def build_app(gr, loaded, args: argparse.Namespace):
    """A gr.ChatInterface for causal models, a gr.Interface classifier for seq_cls ones."""
    from lora_ns.generation import classify, generate

    title = f"lora_ns — {args.adapter}"
    if loaded.task == "seq_cls":
        def predict(text: str, pair: str) -> dict[str, float]:
            result = classify(loaded, [(text, pair or None)], progress=False)[0]
            return result["probabilities"]

        return gr.Interface(predict, [gr.Textbox(label="sentence 1"), gr.Textbox(label="sentence 2 (optional)")],
                            gr.Label(label="prediction"), title=title)

    recipe = loaded.recipe
    chat = bool(loaded.tokenizer.chat_template) and not (recipe and recipe.dataset.prompt_template)

    def respond(message: str, history: list[Any]) -> str:
        # Without a chat format (no template, or training used a prompt_template) each turn stands alone.
        conversation: Any = [*history_messages(history), {"role": "user", "content": message}] if chat else message
        return generate(loaded, [conversation], max_new_tokens=args.max_new_tokens, greedy=args.temperature <= 0,
                        temperature=args.temperature, top_p=args.top_p, batch_size=1, progress=False)[0]

    return gr.ChatInterface(respond, title=title)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    gr = import_gradio()  # before the model: a missing extra should fail in a second, not after loading
    if not Path(args.adapter).exists() and not args.adapter.startswith("builtin:"):
        raise UserError(Problem(args.adapter, "--adapter", "not found", "pass a training output_dir"))
    from lora_ns.inference_model import load_for_inference

    loaded = load_for_inference(args.adapter, base=args.base)
    print(f"{PROG}: serving {loaded.kind} model {args.adapter} on http://{args.host}:{args.port}", file=sys.stderr)
    build_app(gr, loaded, args).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
