"""Renderers. Each has a pure-PyTorch reference that runs on CPU and GPU.

``trellis.renderers.rasterize``: batched triangle rasteriser (``rasterize``, ``interpolate``,
``render_mesh``, ``RasterMesh``), used by the dataset toolkit and for mesh mask/depth/normal renders.
Submodules are imported on use, so ``import trellis.renderers`` stays cheap.
"""
