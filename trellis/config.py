"""Configs: JSON -> validated ``{name, args}`` specs.

A config has three sections, as in TRELLIS::

    {"models":  {"<key>": {"name": <model class>, "args": {...}}, ...},
     "dataset": {"name": <dataset class>, "args": {...}},
     "trainer": {"name": <trainer class>, "args": {...}}}

``validate_config`` resolves every name through its registry and checks every argument against the
constructor signature of the class (following ``**kwargs`` up the MRO), so that a typo is an error
naming its JSON path with a suggestion, e.g.
``trainer.args.lambda_kll: unknown key; did you mean 'lambda_kl'?``. Nested specs inside trainer
args (``optimizer``, ``lr_scheduler``, ``grad_clip``, ``elastic``) are checked the same way.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import json
import os
from typing import Any

from trellis.registry import (
    DATASETS,
    ELASTIC_CONTROLLERS,
    GRAD_CLIPPERS,
    LR_SCHEDULERS,
    MODELS,
    OPTIMIZERS,
    TRAINERS,
    NotImplementedYet,
    Registry,
    RegistryError,
)


class ConfigError(ValueError):
    """A config problem; the message names the JSON path."""


# Arguments the framework passes itself; a config must not (and need not) give them.
INJECTED_ARGS = {
    "dataset": {"roots"},
    "trainer": {"models", "dataset", "output_dir", "load_dir", "step", "dist", "device"},
    "optimizer": {"params"},
    "lr_scheduler": {"optimizer"},
    "grad_clip": set(),
    "elastic": set(),
}

# Nested {name, args} specs inside trainer args and the registry that resolves each.
NESTED_SPECS: dict[str, Registry] = {
    "optimizer": OPTIMIZERS,
    "lr_scheduler": LR_SCHEDULERS,
    "grad_clip": GRAD_CLIPPERS,
    "elastic": ELASTIC_CONTROLLERS,
}


def load_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the top level must be a JSON object")
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value); value parsed as JSON, else kept a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected dotted.path=value")
    path, raw = text.split("=", 1)
    keys = [k for k in path.strip().split(".")]
    if not path.strip() or any(not k for k in keys):
        raise ConfigError(f"--set {text!r}: empty key in path {path!r}")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return keys, value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Returns a copy of ``cfg`` with each ``dotted.path=value`` applied (intermediate dicts created)."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        keys, value = parse_override(text)
        node = cfg
        for i, k in enumerate(keys[:-1]):
            if k not in node:
                node[k] = {}
            node = node[k]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {'.'.join(keys[:i + 1])} is not an object")
        node[keys[-1]] = value
    return cfg


def signature_params(cls: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named constructor parameters of ``cls`` (following ``**kwargs`` up the MRO).

    Returns (params, open) where ``open`` means some class in the chain takes ``**kwargs`` that
    are not forwarded to a base we can inspect (then unknown keys cannot be rejected).
    """
    params: dict[str, inspect.Parameter] = {}
    classes = cls.__mro__ if isinstance(cls, type) else (cls,)
    for c in classes:
        if c is object:
            return params, False
        init = c.__init__ if isinstance(c, type) else c
        if isinstance(c, type) and "__init__" not in c.__dict__:
            continue
        try:
            sig = inspect.signature(init)
        except (TypeError, ValueError):
            return params, True
        has_var_kw = False
        for name, p in sig.parameters.items():
            if name == "self" or p.kind == p.VAR_POSITIONAL:
                continue
            if p.kind == p.VAR_KEYWORD:
                has_var_kw = True
                continue
            params.setdefault(name, p)
        if not has_var_kw:
            return params, False
    return params, True


def check_args(cls: Any, args: Any, path: str, injected: set[str] = frozenset()) -> None:
    """Raises ConfigError for unknown or missing constructor arguments of ``cls``."""
    if not isinstance(args, dict):
        raise ConfigError(f"{path}: must be an object, got {type(args).__name__}")
    params, open_ = signature_params(cls)
    accepted = {n for n in params if n not in injected}
    for key in args:
        if key in injected:
            raise ConfigError(f"{path}.{key}: set by the framework, remove it from the config")
        if key not in params and not open_:
            close = difflib.get_close_matches(key, sorted(accepted), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(accepted))}"
            raise ConfigError(f"{path}.{key}: unknown key{hint}")
    for name, p in params.items():
        if name in injected or name in args:
            continue
        if p.default is inspect.Parameter.empty and p.kind != p.VAR_KEYWORD:
            raise ConfigError(f"{path}.{name}: missing required argument of {getattr(cls, '__name__', cls)}")


def resolve(registry: Registry, spec: Any, path: str) -> Any:
    """Looks up ``spec['name']`` in ``registry``; errors name the JSON path."""
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: must be an object with 'name' and 'args', got {type(spec).__name__}")
    extra = set(spec) - {"name", "args"}
    if extra:
        raise ConfigError(f"{path}: unknown key(s) {sorted(extra)}; a spec has only 'name' and 'args'")
    if "name" not in spec:
        raise ConfigError(f"{path}.name: missing")
    try:
        return registry.get(spec["name"])
    except NotImplementedYet as e:
        raise ConfigError(f"{path}.name: {e}") from None
    except RegistryError as e:
        raise ConfigError(f"{path}.name: {e}") from None


def check_spec(registry: Registry, spec: Any, path: str, injected: set[str] = frozenset()) -> Any:
    cls = resolve(registry, spec, path)
    check_args(cls, spec.get("args", {}), f"{path}.args", injected)
    return cls


def validate_config(cfg: dict) -> None:
    """Checks every name and argument of a config; raises ConfigError naming the first problem."""
    for section in ("models", "dataset", "trainer"):
        if section not in cfg:
            raise ConfigError(f"{section}: missing section (a config has 'models', 'dataset' and 'trainer')")
    extra = set(cfg) - {"models", "dataset", "trainer"}
    if extra:
        raise ConfigError(f"unknown top-level key(s) {sorted(extra)}; valid: models, dataset, trainer")
    models = cfg["models"]
    if not isinstance(models, dict) or not models:
        raise ConfigError("models: must be a non-empty object {key: {name, args}}")
    for key, spec in models.items():
        check_spec(MODELS, spec, f"models.{key}")
    check_spec(DATASETS, cfg["dataset"], "dataset", INJECTED_ARGS["dataset"])
    trainer_cls = check_spec(TRAINERS, cfg["trainer"], "trainer", INJECTED_ARGS["trainer"])
    targs = cfg["trainer"].get("args", {})
    for key, registry in NESTED_SPECS.items():
        spec = targs.get(key)
        if spec is None or (key == "grad_clip" and isinstance(spec, (int, float))):
            continue
        if key == "optimizer" and spec == {}:
            continue
        check_spec(registry, spec, f"trainer.args.{key}", INJECTED_ARGS[key])
    check = getattr(trainer_cls, "check_config", None)
    if check is not None:
        check(cfg)


def build_models(cfg: dict) -> dict:
    """Instantiates ``cfg['models']`` in config-key order."""
    return {key: MODELS.get(spec["name"])(**spec.get("args", {})) for key, spec in cfg["models"].items()}


def build_dataset(cfg: dict, roots: str) -> Any:
    spec = cfg["dataset"]
    return DATASETS.get(spec["name"])(roots, **spec.get("args", {}))
