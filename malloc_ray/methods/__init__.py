"""Memory methods, one module each. Adding a method: its module plus one import line here."""

from malloc_ray.methods import h2o, heads, intactkv, kivi, mla, native, recompute, snapkv  # noqa: F401,E501
from malloc_ray.methods.base import REGISTRY, LayerMemory, Method, get_method, method_names, register

__all__ = ["REGISTRY", "LayerMemory", "Method", "get_method", "method_names", "register"]
