"""Liu et al. 2025 (part B): perception from image keys / values inside the LM.

features (one batched capture per image set) -> metrics (the six task scores) ->
perceive (B1), artifacts (B2), prefix (B3), surface (B4); plots for the figures.
"""
