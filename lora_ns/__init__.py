"""lora_ns: parameter-efficient fine-tuning recipes on the Hugging Face stack."""

__version__ = "0.1.0"
