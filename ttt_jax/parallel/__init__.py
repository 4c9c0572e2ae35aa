"""Device mesh and sharding of parameters and batches."""
