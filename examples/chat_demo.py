"""``python examples/chat_demo.py --adapter OUT_DIR``: chat with a trained model in the browser (gradio).

gradio is an optional extra (``pip install 'lora_ns[demo]'``); without it this says so in one line before
loading anything. The model is loaded as `lora_ns.infer` loads it; a seq_cls model gets a classifier page
(label and class probabilities) instead of a chat.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_ns.errors import Problem, UserError, require, run_cli
from lora_ns.infer import earliest_beyond_context, takes_pairs
from lora_ns.inference import classify, generate, is_chat, load

PROG = "chat_demo"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python examples/chat_demo.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="a training output dir (adapter), a merged dir, or a base model")
    parser.add_argument("--base", help="base model for the adapter (default: the one in adapter_config.json)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: the LAN too)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="ask gradio for a public share link")
    return parser


def history_messages(history: list[Any]) -> list[dict[str, str]]:
    """Chat history as role/content messages, from gradio's "messages" format or its older (user, bot)
    pairs; files and components, which a text model cannot read, are skipped."""
    messages: list[dict[str, str]] = []
    for item in history or []:
        if not isinstance(item, dict):
            messages += [{"role": "user", "content": str(item[0])},
                         {"role": "assistant", "content": str(item[1] or "")}]
        elif isinstance(item.get("content"), str):
            messages.append({"role": item["role"], "content": item["content"]})
    return messages


def build_app(gr, loaded, args: argparse.Namespace):
    """A gr.ChatInterface for causal models, a gr.Interface classifier for seq_cls ones."""
    title = f"lora_ns — {args.adapter}"
    if loaded.task == "seq_cls":
        pairs = takes_pairs(loaded.recipe)  # trained on sentence pairs: one text alone means nothing to it

        def predict(text: str, pair: str) -> dict[str, float]:
            if pairs and not pair.strip():
                raise gr.Error("this classifier was trained on sentence pairs: fill in sentence 2")
            return classify(loaded, [(text, pair or None)], progress=False)[0]["probabilities"]

        boxes = [gr.Textbox(label="sentence 1"), gr.Textbox(label="sentence 2" + " (optional)" * (not pairs))]
        return gr.Interface(predict, boxes, gr.Label(label="prediction"), title=title)
    chat = is_chat(loaded)  # else (no template, or training used a prompt_template) each turn stands alone

    def respond(message: str, history: list[Any]) -> str:
        turn = [*history_messages(history), {"role": "user", "content": message}] if chat else message
        if chat:  # as `infer --interactive`: the earliest exchanges leave once the context is outgrown
            turn = turn[earliest_beyond_context(loaded, turn, args.max_new_tokens):]
        return generate(loaded, [turn], max_new_tokens=args.max_new_tokens, greedy=args.temperature <= 0,
                        temperature=args.temperature, top_p=args.top_p, batch_size=1, progress=False)[0]

    return gr.ChatInterface(respond, title=title)


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    gr = require("gradio", "demo", "the chat demo")  # before the model: fail in a second, not after loading
    if not Path(args.adapter).exists() and not args.adapter.startswith("builtin:"):
        raise UserError(Problem(args.adapter, "--adapter", "not found", "pass a training output_dir"))
    loaded = load(args.adapter, base=args.base)
    print(f"{PROG}: serving {loaded.kind} model {args.adapter} on http://{args.host}:{args.port}",
          file=sys.stderr)
    build_app(gr, loaded, args).launch(server_name=args.host, server_port=args.port, share=args.share)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(PROG, lambda: main(sys.argv[1:])))
