"""Ranking over any backend: the title tree, constrained beam search, candidate scoring, the collaborative assistant and the Ranker. No torch."""
