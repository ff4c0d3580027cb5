"""Entry points with side effects (training, evaluation, analyses) over experiments.pipeline;
the library never imports these."""
