"""The machine a run lives on: devices, speed settings, processes and signals, atomic
files, verified downloads, and matplotlib in one place. Knows no model and no data set.
"""
