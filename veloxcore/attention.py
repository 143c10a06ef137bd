"""Route decode-step attention to caches that attend from their own codes.

mlx-lm's attention modules call the ``scaled_dot_product_attention`` of their
model module (``mlx_lm.models.base``'s, imported by name). ``install`` wraps that
name in each model module used by a model: a cache that sets ``fused_decode``
answers single-token queries itself (``cache.attend``), reading packed codes
instead of a decoded copy; every other call goes to mlx-lm's function unchanged.
The wrapper is idempotent and leaves other caches' behaviour untouched.
"""

from __future__ import annotations

import sys

_MARK = "_velox_dispatch"


def _dispatching(original):
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None,
                                     **kwargs):
        if (getattr(cache, "fused_decode", False) and queries.shape[2] == 1 and sinks is None
                and not kwargs and (mask is None or isinstance(mask, str))):
            return cache.attend(queries, scale)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                        sinks=sinks, **kwargs)

    setattr(scaled_dot_product_attention, _MARK, original)
    return scaled_dot_product_attention


def model_modules(model) -> list:
    """The Python modules defining the model's layers (where attention looks up
    ``scaled_dot_product_attention``)."""
    layers = getattr(model, "layers", None) or getattr(getattr(model, "model", None),
                                                       "layers", [])
    names = {type(layer).__module__ for layer in layers}
    return [sys.modules[n] for n in sorted(names) if n in sys.modules]


def install(model) -> bool:
    """Hook the model's attention; False if a layer's module has no hook point."""
    modules = model_modules(model)
    if not modules or not all(hasattr(m, "scaled_dot_product_attention") for m in modules):
        return False
    for module in modules:
        current = module.scaled_dot_product_attention
        if not hasattr(current, _MARK):
            module.scaled_dot_product_attention = _dispatching(current)
    return True


def uninstall(model) -> None:
    for module in model_modules(model):
        current = getattr(module, "scaled_dot_product_attention", None)
        if hasattr(current, _MARK):
            module.scaled_dot_product_attention = getattr(current, _MARK)
