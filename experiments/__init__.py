"""Entrypoints with side effects (training, evaluation, ablations); the library never imports these."""
