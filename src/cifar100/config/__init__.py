"""Settings: the frozen dataclasses every run is made of, their valid ranges, and the
named presets (``presets/*.yaml``). The bottom layer: imports nothing else of the project.
"""
