"""Training, read top-down: ``train`` (config in, run folder out) -> ``plans`` (which
stages a model trains) -> ``loop`` (the epochs of a stage) -> ``engine`` (one step).
Knowledge distillation lives in ``distill/``.
"""
