"""Data-preparation library: formats, sources, shards and params for the DVC stages."""
