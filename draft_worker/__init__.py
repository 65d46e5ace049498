"""Draft worker: the small model; proposes k tokens with the exact distributions they came from."""
