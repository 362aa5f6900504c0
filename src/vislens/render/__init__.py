"""Plots and self-contained HTML (no network: CSS, JS and images inline), drawn from
plain data: numbers, images, token positions. Nothing here knows an experiment or a
model, so experiments draw their run's figures with it and the study report lays
them out (vislens.report, above the experiments)."""
