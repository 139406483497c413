"""A run folder: what a run was and did, the lock that keeps it whole, and a trained model
read back from it.
"""
