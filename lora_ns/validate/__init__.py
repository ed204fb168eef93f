"""Recipe checks behind ``python -m lora_ns.validate`` (command line in ``__main__``, not imported here so
``python -m`` finds it unloaded): `rules`, `model`, `data`, `launch`. They run inside train's own set-up
(`lora_ns.setup.setup`): validate is train's set-up stopped before the weights."""
