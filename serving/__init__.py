"""serving: Ray Serve application routing requests to stitches by X-Compute-Budget."""
