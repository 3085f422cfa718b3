"""training: one-stage PST + SNIP adaptation of an anchor pair into a palette."""
