"""Quick start in Python: train a recipe, then show what training changed on held-out data.

    python examples/quick_start.py                                   # -> outputs/quickstart/
    python examples/quick_start.py training.output_dir=/tmp/qs training.max_steps=20
    python examples/quick_start.py recipes/demo.yaml                 # the real small model (make demo)

Prints the held-out loss before and after training (the recipe's ``eval_on_start``) and one held-out
question answered by the base model and by the tuned one.

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

from lora_ns.answers import answers_match, extract_answer  # noqa: E402
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
        from lora_ns.inference import generate, load
    except ImportError:  # plain transformers + peft do the same for a chat-template model
        from peft import AutoPeftModelForCausalLM
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
        model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir).eval()
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        out = model.generate(**ids, max_new_tokens=64, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    loaded = load(adapter_dir)
    return generate(loaded, [question], max_new_tokens=64, greedy=True, progress=False)[0]


def final_answer(reply: str, reference: str) -> str:
    """The final answer `lora_ns.evaluate` would score in a reply, and whether it is the reference's."""
    got, want = extract_answer(reply), extract_answer(reference)
    if got is None:
        return "no final answer"
    return f"final answer {got}: {'right' if answers_match(got, want) else f'wrong (reference {want})'}"


def eval_losses(log_history: list[dict]) -> list[float]:
    return [entry["eval_loss"] for entry in log_history if "eval_loss" in entry]


def main(argv: list[str] | None = None) -> int:
    from lora_ns.run_record import next_lines
    from lora_ns.train import run_training

    argv = list(argv or [])
    recipe_file = Path(argv.pop(0)) if argv and argv[0].endswith((".yaml", ".yml")) else RECIPE
    recipe = load_recipe(recipe_file, argv)
    example = sample_question(recipe)
    before = answer(recipe.model.name_or_path, example["prompt"])  # the base model, untrained
    trainer, summary = run_training(recipe)  # also prints the summary, writes loss_curve.png + summary.txt
    out = Path(summary["output_dir"])
    losses = eval_losses(trainer.state.log_history)
    if recipe.training.get("eval_on_start") and len(losses) >= 2:
        print(f"\nheld-out loss: {losses[0]:.4f} before training -> {losses[-1]:.4f} after")
    print(f"\nquestion:  {example['prompt']}")
    print(f"reference: {example['completion']}")
    after = answer(str(out), example["prompt"])
    for name, reply in (("before:", before), ("model:", after)):
        print(f"{name:<10} {' '.join(reply.split())[:300]}")
        print(f"{'':<10} -> {final_answer(reply, example['completion'])}")
    print(f"\nloss curve: {out / 'loss_curve.png'}")
    print(f"summary:    {out / 'summary.txt'}")
    print("", *next_lines(out), sep="\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("quick_start", lambda: main(sys.argv[1:])))
