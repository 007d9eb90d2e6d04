"""The config tree: the model's dataclasses (model.py), LoRA's node (lora.py), the field kinds
that make each field a CLI flag (fields.py) and the named presets (flavors.py)."""
