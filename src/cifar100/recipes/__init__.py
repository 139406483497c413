"""From presets, files and flags to one checked ``Config``; and the config a resumed run
continues with.
"""
