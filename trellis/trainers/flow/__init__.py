"""Rectified-flow trainers (``flow_matching``), their components and snapshot helpers."""
