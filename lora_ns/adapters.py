"""Build the peft config a recipe asks for, wrap the model with it, and keep AdaLoRA's budget moving.

`peft.method` picks the peft config class; every other key of the recipe's `peft:` section is a field of
that class, passed as is. lora_ns fills in only what peft cannot know from the recipe alone (`peft_options`).
For SEQ_CLS peft itself adds the classification head (``classifier`` / ``score``) to ``modules_to_save``,
so it is trained and saved with the adapter.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

from lora_ns.builtin_models import resolve_model_path
from lora_ns.config import Recipe
from lora_ns.hf_fields import peft_config_class, peft_task_type


def peft_options(recipe: Recipe) -> dict[str, Any]:
    """The recipe's peft fields plus the defaults lora_ns derives from the rest of the recipe: all-linear
    targets, 20 virtual tokens, the model's tokenizer for TEXT prompt init, AdaLoRA's total_step.

    A deep copy: peft extends lists it is given in place (SEQ_CLS adds the heads to ``modules_to_save``),
    which would otherwise change the recipe, and the saved recipe.yaml with it."""
    method = recipe.peft.method
    options: dict[str, Any] = copy.deepcopy(recipe.peft.options)
    if method in ("lora", "qlora", "adalora"):
        options.setdefault("target_modules", "all-linear")
    if method in ("prefix_tuning", "prompt_tuning"):
        options.setdefault("num_virtual_tokens", 20)
    if method == "prompt_tuning" and "prompt_tuning_init" in options:  # peft compares with its enum: an
        from peft import PromptTuningInit  # unknown word, or "text" in lower case, inits at random unsaid

        if (init := str(options["prompt_tuning_init"]).upper()) not in PromptTuningInit.__members__:
            raise ValueError(f"prompt_tuning_init '{options['prompt_tuning_init']}' is none of peft's "
                             f"{', '.join(PromptTuningInit.__members__)}")
        options["prompt_tuning_init"] = PromptTuningInit[init]
    if method == "prompt_tuning" and options.get("prompt_tuning_init") == "TEXT":
        m = recipe.model
        tokenizer = resolve_model_path(m.tokenizer_name_or_path or m.name_or_path)
        options.setdefault("tokenizer_name_or_path", tokenizer)
    if method == "adalora" and not options.get("total_step"):
        max_steps = int(recipe.training.get("max_steps", -1))
        # Provisional when max_steps is unknown: AdaLoraCallback sets the real count at train start.
        provisional = options.get("tinit", 0) + options.get("tfinal", 0) + 1
        options["total_step"] = max_steps if max_steps > 0 else provisional
    return options


# peft saves a projected prefix as the prefix it made: the projection (what trains) is not in the file
PROJECTION_NOT_SAVED = ("prefix tuning with prefix_projection saves the prefix its projection made, not the "
                        "projection that trains, so it cannot be trained further")


def peft_config(recipe: Recipe):
    """A peft config object, or None for full fine-tuning; with ``peft.init_from``, that adapter's own."""
    if recipe.peft.method == "full":
        return None
    if recipe.peft.init_from:
        from peft import PeftConfig

        config = PeftConfig.from_pretrained(recipe.peft.init_from)
        config.inference_mode = False
        return config
    config_class = peft_config_class(recipe.peft.method)
    return config_class(task_type=peft_task_type(recipe.task), **peft_options(recipe))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts, peft's or transformers' (both know a 4-bit byte packs two)."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    return model.num_parameters(only_trainable=True), model.num_parameters()


def apply_peft(model, recipe: Recipe):
    """Wrap the model with the recipe's adapter (unchanged for full fine-tuning), or load ``peft.init_from``
    trainable: a new run that starts from an earlier adapter (resume instead continues the same run)."""
    config = peft_config(recipe)
    if config is None:
        return model
    from peft import PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict

    on_meta = next(model.parameters()).is_meta  # validate's weightless model: the shapes are enough
    if not recipe.peft.init_from or on_meta:
        return get_peft_model(model, config)
    if not config.is_prompt_learning:  # train on from an earlier adapter's weights
        return PeftModel.from_pretrained(model, recipe.peft.init_from, is_trainable=True)
    # peft loads prompt-learning adapters for inference only; what they save (without prefix_projection,
    # refused by validate) is the very embedding a new adapter trains, so load it into one
    wrapped = get_peft_model(model, config)
    set_peft_model_state_dict(wrapped, load_peft_weights(recipe.peft.init_from))
    return wrapped


def training_callbacks(recipe: Recipe) -> list:
    """Trainer callbacks the peft method needs: AdaLoRA's rank allocation after each optimizer step.

    Trainer and TRL never call ``update_and_allocate``. It reads the gradients, so it must run after
    ``optimizer.step()`` and before ``zero_grad()``: exactly where Trainer fires ``on_optimizer_step``.
    With no total_step in the recipe (and no max_steps), the trainer's own step count is set at the start.
    """
    if recipe.peft.method != "adalora":
        return []
    from transformers import TrainerCallback

    set_total_step = not recipe.peft.options.get("total_step")

    class AdaLoraCallback(TrainerCallback):
        allocate = True

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # an adapter continued with peft.init_from comes cut to the ranks it was allocated: train those
            self.allocate = model is not None and not model.peft_config[model.active_adapter].rank_pattern
            if self.allocate and set_total_step:
                model.base_model.rankallocator.set_total_step(state.max_steps)

        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            if self.allocate and model is not None:
                model.base_model.update_and_allocate(state.global_step)

    return [AdaLoraCallback()]


def merge_blocker(model) -> str | None:
    """Why peft cannot fold this adapter into its base weights, or None: a lora_bias on a layer without a
    bias (peft's merge raises; the adapter still works unmerged)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and any(module.lora_bias.values()):
            if getattr(module.get_base_layer(), "bias", None) is None:
                return f"lora_bias on {name.removeprefix('base_model.model.')}, a layer without a bias"
    return None


@functools.cache
def prefix_generation_problem() -> str | None:
    """Why a prefix-tuned model cannot generate with the installed peft and transformers, or None. Tried,
    not assumed: peft 0.21 hands the virtual keys to `generate` as ``past_key_values``, which transformers
    5's models (reading ``cache``) ignore, so the base model answers. Probed on a random 1-layer Llama."""
    import warnings

    import torch
    from peft import PrefixTuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    with torch.random.fork_rng(), warnings.catch_warnings():
        torch.manual_seed(0)
        warnings.simplefilter("ignore")  # transformers' deprecation notes on what peft calls
        model = get_peft_model(LlamaForCausalLM(config), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                            num_virtual_tokens=4))
    if generates_as_it_scores(model.eval()):
        return None
    return "peft's prefix tuning does not reach transformers' generate in these versions (the base model " \
        "answers, as if untuned)"


def generates_as_it_scores(model) -> bool:
    """Whether `model` scores its first two greedily generated tokens as plain forward passes score them."""
    import warnings

    import torch
    from transformers import logging

    ids, verbosity = torch.tensor([[1, 2, 3]]), logging.get_verbosity()
    logging.set_verbosity_error()  # generate's notes on a toy model's generation config
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # transformers' deprecation notes on what peft passes
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2,
                                 do_sample=False, output_logits=True, return_dict_in_generate=True)
            steps = [out.sequences[:, :3], out.sequences[:, :4]]
            wanted = [model(input_ids=s, attention_mask=torch.ones_like(s)).logits[:, -1] for s in steps]
    finally:
        logging.set_verbosity(verbosity)
    # the same fp32 sums in another order: 1e-4 is far above their rounding, far below the prefix's effect
    return all(torch.allclose(got, want, atol=1e-4) for got, want in zip(out.logits, wanted))
