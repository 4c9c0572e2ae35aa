"""Neural-network layers: the TTT layer, rotary embeddings."""
