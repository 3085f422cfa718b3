"""stitchlib: weight-shared stitched LMs from one anchor pair (ESTA: PST + SNIP)."""
