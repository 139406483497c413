"""The evaluation report's files: figures as PNG, Markdown, one self-contained HTML page."""
