"""Structured-latent (SLat) VAE: the sparse transformer trunk, the encoder and the decoders.

Modules are imported lazily by the model registry (``trellis.registry.MODELS``); import the
submodules directly (``trellis.models.structured_latent_vae.encoder``).
"""
