"""Concepts: the caption vocabulary, the frozen teacher, its concept classifiers and the pseudo-labels they give."""
