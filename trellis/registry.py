"""Lazy registries: one per kind of pluggable object.

Every pluggable object in a config is ``{"name": ..., "args": {...}}``. The name is looked up in the
registry of its kind. Entries are lazy (``"module:attr"`` strings) so that importing ``trellis`` stays
cheap and a class whose module does not exist yet reports "not implemented yet" instead of an
``ImportError`` deep inside a build.

    >>> from trellis.registry import MODELS
    >>> cls = MODELS.get("SparseStructureEncoder")
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Callable


class RegistryError(KeyError):
    """An unknown or unavailable name. ``str()`` is a complete, readable message."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0]) if self.args else ""


class NotImplementedYet(RegistryError):
    """A name of the original TRELLIS whose implementation has not landed in this framework yet."""


class Registry:
    """Maps names to classes or factories, importing their modules on first use."""

    def __init__(self, kind: str, lazy: dict[str, str] | None = None):
        self.kind = kind
        self._lazy: dict[str, str] = dict(lazy or {})
        self._loaded: dict[str, Any] = {}
        self._fallbacks: list[tuple[Callable[[str], Any], Callable[[], list[str]] | None]] = []

    def register(self, name: str | None = None) -> Callable[[Any], Any]:
        """Decorator: ``@MODELS.register()`` registers a class under its own name."""

        def deco(obj: Any) -> Any:
            self._loaded[name or obj.__name__] = obj
            return obj

        return deco

    def add(self, name: str, target: str | Any) -> None:
        """Adds ``name`` -> ``"module:attr"`` (lazy) or an object."""
        if isinstance(target, str):
            self._lazy[name] = target
        else:
            self._loaded[name] = target

    def add_fallback(self, fn: Callable[[str], Any], names: Callable[[], list[str]] | None = None) -> None:
        """``fn(name)`` returns an object or None; used for open families such as ``torch.optim``.
        ``names()`` lists what the fallback knows, for error messages."""
        self._fallbacks.append((fn, names))

    def names(self) -> list[str]:
        extra = [n for _, names in self._fallbacks if names is not None for n in names()]
        return sorted(set(self._lazy) | set(self._loaded) | set(extra))

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except RegistryError:
            return False
        return True

    def get(self, name: str) -> Any:
        if not isinstance(name, str):
            raise RegistryError(f"{self.kind} name must be a string, got {type(name).__name__}: {name!r}")
        if name in self._loaded:
            return self._loaded[name]
        if name in self._lazy:
            module_name, attr = self._lazy[name].split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
                    raise NotImplementedYet(
                        f"{self.kind} '{name}' is part of TRELLIS but not implemented yet in this framework "
                        f"(module {module_name} does not exist)"
                    ) from None
                raise
            if not hasattr(module, attr):
                raise NotImplementedYet(
                    f"{self.kind} '{name}' is part of TRELLIS but not implemented yet in this framework "
                    f"({module_name} has no attribute {attr})"
                )
            obj = getattr(module, attr)
            self._loaded[name] = obj
            return obj
        for fb, _ in self._fallbacks:
            obj = fb(name)
            if obj is not None:
                self._loaded[name] = obj
                return obj
        known = self.names()
        same_case = [k for k in known if k.lower() == name.lower()]
        close = same_case or difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise RegistryError(f"unknown {self.kind} '{name}'.{hint} Known: {', '.join(known)}")


MODELS = Registry(
    "model",
    {
        "SparseStructureEncoder": "trellis.models.sparse_structure_vae:SparseStructureEncoder",
        "SparseStructureDecoder": "trellis.models.sparse_structure_vae:SparseStructureDecoder",
        "SparseStructureFlowModel": "trellis.models.sparse_structure_flow:SparseStructureFlowModel",
        "SLatEncoder": "trellis.models.structured_latent_vae.encoder:SLatEncoder",
        "ElasticSLatEncoder": "trellis.models.structured_latent_vae.encoder:ElasticSLatEncoder",
        "SLatGaussianDecoder": "trellis.models.structured_latent_vae.decoder_gs:SLatGaussianDecoder",
        "ElasticSLatGaussianDecoder": "trellis.models.structured_latent_vae.decoder_gs:ElasticSLatGaussianDecoder",
        "SLatRadianceFieldDecoder": "trellis.models.structured_latent_vae.decoder_rf:SLatRadianceFieldDecoder",
        "ElasticSLatRadianceFieldDecoder":
            "trellis.models.structured_latent_vae.decoder_rf:ElasticSLatRadianceFieldDecoder",
        "SLatMeshDecoder": "trellis.models.structured_latent_vae.decoder_mesh:SLatMeshDecoder",
        "ElasticSLatMeshDecoder": "trellis.models.structured_latent_vae.decoder_mesh:ElasticSLatMeshDecoder",
        "SLatFlowModel": "trellis.models.structured_latent_flow:SLatFlowModel",
        "ElasticSLatFlowModel": "trellis.models.structured_latent_flow:ElasticSLatFlowModel",
    },
)

DATASETS = Registry(
    "dataset",
    {
        "SparseStructure": "trellis.datasets.sparse_structure:SparseStructure",
        "SparseFeat2Render": "trellis.datasets.sparse_feat2render:SparseFeat2Render",
        "SLat2Render": "trellis.datasets.structured_latent2render:SLat2Render",
        "Slat2RenderGeo": "trellis.datasets.structured_latent2render:Slat2RenderGeo",
        "SparseStructureLatent": "trellis.datasets.sparse_structure_latent:SparseStructureLatent",
        "TextConditionedSparseStructureLatent":
            "trellis.datasets.sparse_structure_latent:TextConditionedSparseStructureLatent",
        "ImageConditionedSparseStructureLatent":
            "trellis.datasets.sparse_structure_latent:ImageConditionedSparseStructureLatent",
        "SLat": "trellis.datasets.structured_latent:SLat",
        "TextConditionedSLat": "trellis.datasets.structured_latent:TextConditionedSLat",
        "ImageConditionedSLat": "trellis.datasets.structured_latent:ImageConditionedSLat",
    },
)

_FLOW = "trellis.trainers.flow.flow_matching"
TRAINERS = Registry(
    "trainer",
    {
        "SparseStructureVaeTrainer": "trellis.trainers.vae.sparse_structure_vae:SparseStructureVaeTrainer",
        "SLatVaeGaussianTrainer": "trellis.trainers.vae.structured_latent_vae_gaussian:SLatVaeGaussianTrainer",
        "SLatVaeRadianceFieldDecoderTrainer":
            "trellis.trainers.vae.structured_latent_vae_rf_dec:SLatVaeRadianceFieldDecoderTrainer",
        "SLatVaeMeshDecoderTrainer": "trellis.trainers.vae.structured_latent_vae_mesh_dec:SLatVaeMeshDecoderTrainer",
        "FlowMatchingTrainer": f"{_FLOW}:FlowMatchingTrainer",
        "FlowMatchingCFGTrainer": f"{_FLOW}:FlowMatchingCFGTrainer",
        "TextConditionedFlowMatchingCFGTrainer": f"{_FLOW}:TextConditionedFlowMatchingCFGTrainer",
        "ImageConditionedFlowMatchingCFGTrainer": f"{_FLOW}:ImageConditionedFlowMatchingCFGTrainer",
        "SparseFlowMatchingTrainer": f"{_FLOW}:SparseFlowMatchingTrainer",
        "SparseFlowMatchingCFGTrainer": f"{_FLOW}:SparseFlowMatchingCFGTrainer",
        "TextConditionedSparseFlowMatchingCFGTrainer": f"{_FLOW}:TextConditionedSparseFlowMatchingCFGTrainer",
        "ImageConditionedSparseFlowMatchingCFGTrainer": f"{_FLOW}:ImageConditionedSparseFlowMatchingCFGTrainer",
    },
)

GRAD_CLIPPERS = Registry("grad clipper", {"AdaptiveGradClipper": "trellis.trainers.utils:AdaptiveGradClipper"})

ELASTIC_CONTROLLERS = Registry(
    "elastic memory controller", {"LinearMemoryController": "trellis.trainers.elastic:LinearMemoryController"}
)

OPTIMIZERS = Registry("optimizer")
LR_SCHEDULERS = Registry(
    "lr scheduler", {"LinearWarmupLRScheduler": "trellis.trainers.utils:LinearWarmupLRScheduler"}
)


def _torch_attr(module_name: str, base: str) -> Callable[[str], Any]:
    def lookup(name: str) -> Any:
        module = importlib.import_module(module_name)
        obj = getattr(module, name, None)
        base_cls = getattr(module, base)
        if isinstance(obj, type) and issubclass(obj, base_cls) and obj is not base_cls:
            return obj
        return None

    return lookup


def _torch_names(module_name: str, base: str) -> list[str]:
    module = importlib.import_module(module_name)
    base_cls = getattr(module, base)
    return sorted(
        n for n in dir(module)
        if isinstance(getattr(module, n), type) and issubclass(getattr(module, n), base_cls)
        and getattr(module, n) is not base_cls and not n.startswith("_")
    )


OPTIMIZERS.add_fallback(_torch_attr("torch.optim", "Optimizer"), lambda: _torch_names("torch.optim", "Optimizer"))
LR_SCHEDULERS.add_fallback(
    _torch_attr("torch.optim.lr_scheduler", "LRScheduler"),
    lambda: _torch_names("torch.optim.lr_scheduler", "LRScheduler"),
)
