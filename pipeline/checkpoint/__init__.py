"""Checkpoints: the manager (manifest, signing, keep-last-n, resume choice), weights-only loading, the run lock."""
