"""Plots and self-contained HTML (no network: CSS, JS and images inline)."""
