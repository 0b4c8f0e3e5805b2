"""Statistics of a dataset: per-mask and per-image tables, the HTML report with the
SA-1B paper's figures, and the dataset card."""
