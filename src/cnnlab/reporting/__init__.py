"""Plots and reports of a run: matplotlib figures saved as PNG, and the HTML report."""
