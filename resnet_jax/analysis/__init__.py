"""Finished runs studied as the paper studies them: layer responses and the lesion study
(`layer_responses`, Fig. 7) and the paper's reported errors (`paper_results`); the `report`
command draws on both."""
