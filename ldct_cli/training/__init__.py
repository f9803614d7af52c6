"""Training: the loop, the per-recipe steps, data and auxiliary networks."""
