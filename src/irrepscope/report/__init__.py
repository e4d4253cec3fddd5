"""Reports: sweep summaries and analysis reports as self-contained HTML."""
