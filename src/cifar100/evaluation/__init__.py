"""Test-set figures: inference with TTA, metrics, calibration, ensembles chosen on the
validation split, a run's cached logits, and (``report/``) the files that show them.
"""
