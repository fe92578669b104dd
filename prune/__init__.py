"""Pruning: SparseGPT (Frantar & Alistarh 2023, arXiv:2301.00774), with magnitude and Wanda baselines.

Not written yet: this package holds nothing so far (see README, "Not done yet").
"""
