"""Finished runs studied as the paper studies them: the results table (`tables`), the figures
(`figures`: Fig. 4, 6, 7 and the lesion study), layer responses and the lesion study
(`layer_responses`) and the paper's reported errors (`paper_results`); the `report` command
draws on them."""
