"""Memory methods. Each module imported below registers its methods, usually one named like the
module (heads.py: gqa and mqa; recompute.py: wo_mem; collective.py: collectivekv); shared
helpers are in `common/` and register nothing. Adding a method: docs/methods/README.md
("Adding a method")."""

# One line per method module; importing a module registers its methods.
from malloc_ray.methods import beacon  # noqa: F401
from malloc_ray.methods import collective  # noqa: F401
from malloc_ray.methods import h2o  # noqa: F401
from malloc_ray.methods import heads  # noqa: F401
from malloc_ray.methods import intactkv  # noqa: F401
from malloc_ray.methods import kivi  # noqa: F401
from malloc_ray.methods import linformer  # noqa: F401
from malloc_ray.methods import longformer  # noqa: F401
from malloc_ray.methods import mla  # noqa: F401
from malloc_ray.methods import native  # noqa: F401
from malloc_ray.methods import rec2pm  # noqa: F401
from malloc_ray.methods import recompute  # noqa: F401
from malloc_ray.methods import reformer  # noqa: F401
from malloc_ray.methods import rwkv  # noqa: F401
from malloc_ray.methods import snapkv  # noqa: F401
from malloc_ray.methods import ssm  # noqa: F401
from malloc_ray.methods.base import REGISTRY, LayerMemory, Method, get_method, method_names, register

__all__ = ["REGISTRY", "LayerMemory", "Method", "get_method", "method_names", "register"]
