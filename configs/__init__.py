"""Training configs: one file per curriculum stage, `get_config(arg)` presets."""
