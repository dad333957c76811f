"""Applications built on flows: optimal transport, density ratios, worst-case sampling."""
