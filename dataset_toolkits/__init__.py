"""Dataset toolkit: one stage per module (``python -m dataset_toolkits.<stage>``) over a ledger.

Stages: build_metadata, render, voxelize, render_cond (geometry); extract_feature,
encode_ss_latent, encode_latent, stat_latent (features and latents). Shared pieces: ``ledger``
(metadata.csv, record files, merging), ``stage`` (``run_stage``), ``mesh_io`` (asset loading),
``datasets`` (sources). See docs/DATASET_TOOLKIT.md.
"""
