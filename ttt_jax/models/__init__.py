"""Frozen pre-trained components: latent video codecs and caption encoders."""
