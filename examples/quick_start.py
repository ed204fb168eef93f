"""Quick start in Python: train the embedded default recipe, then ask the tuned model a question.

    python examples/quick_start.py                                   # -> outputs/quickstart/
    python examples/quick_start.py training.output_dir=/tmp/qs training.max_steps=20

Runs offline on a CPU in about a minute: a tiny random Llama (builtin:tiny-llama) learns the bundled
GSM8K-style sample with LoRA. Its answers are not meant to be good, only to show the whole path:
recipe -> training -> adapter on disk -> generation with the adapter. Extra arguments are recipe
overrides, as for ``python -m lora_ns.train``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("lora_ns") is None:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from lora_ns.config import load_recipe  # noqa: E402
from lora_ns.errors import run_cli  # noqa: E402

RECIPE = REPO / "recipes" / "quickstart.yaml"


def sample_question(recipe) -> dict[str, str]:
    """The first held-out example (not trained on), formatted: {"prompt": ..., "completion": ...}."""
    from lora_ns.data import formatted_examples

    return next(iter(formatted_examples(recipe, split=recipe.dataset.val_split, limit=1)))


def answer(adapter_dir: str, question: str) -> str:
    """Generate with the saved adapter, prompts rendered as in training (lora_ns.infer when installed)."""
    try:
        from lora_ns.inference_model import load_for_inference
        from lora_ns.infer import generate
    except ImportError:  # plain transformers + peft do the same for a chat-template model
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    loaded = load_for_inference(adapter_dir)
    return generate(loaded, [question], max_new_tokens=64, greedy=True, progress=False)[0]


def main(argv: list[str] | None = None) -> int:
    from lora_ns.train import train

    recipe = load_recipe(RECIPE, argv)
    summary = train(recipe)  # also prints the summary and writes loss_curve.png + summary.txt
    out = Path(summary["output_dir"])
    example = sample_question(recipe)
    print(f"\nquestion:  {example['prompt']}")
    print(f"reference: {example['completion']}")
    print(f"model:     {' '.join(answer(str(out), example['prompt']).split())[:300]}")
    print(f"\nloss curve: {out / 'loss_curve.png'}")
    print(f"summary:    {out / 'summary.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("quick_start", lambda: main(sys.argv[1:])))
