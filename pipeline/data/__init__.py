"""Data: where the shards are, checking and streaming them, collating batches, preparing shards (optsel prepare)."""
