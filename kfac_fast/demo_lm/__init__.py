"""Demo (issue 19): K-FAC against AdamW, SOAP and Muon on a small causal character
transformer, trained on text that `text.make_text` writes from a small grammar (no
download). `make demo-lm` runs `python -m kfac_fast.demo_lm`: every method with a
two-point grid and 3 seeds, the same batches for all; it prints the validation loss at
equal steps and at equal seconds and writes demo_out/demo_lm.png.

Modules: `text` (the corpus), `model` (the transformer), `methods` (the optimisers and
their grids), `eigen_adam` (Adam in the eigenbasis of K-FAC's factors), `training` (one
timed run), `report` (table, targets, plot), `cli`, and `timing` (`python -m
kfac_fast.demo_lm.timing`: per-step cost against AdamW's by alternation).
"""
