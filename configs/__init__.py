"""Experiment configs: one ``get_config()`` per file (``--config configs/<name>.py[:arg]``)."""
