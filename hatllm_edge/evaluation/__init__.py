"""Quality on the loo-full protocol: full-catalog evaluation, the decoding grid (fuse), candidate-score fidelity."""
