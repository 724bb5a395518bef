"""pdcompile: Hugging Face causal LMs as a prefill graph and a decode graph, compiled.

    model = pdcompile.optimize(AutoModelForCausalLM.from_pretrained(path))
    model.generate(**inputs, max_new_tokens=64)
"""

from . import ops  # noqa: F401  (registers the pdcompile:: operators)
from .api import default_max_seq_len, optimize
from .bundle import BundleError, export, load
from .capture import UnsupportedModelError
from .config import CacheConfig, OptimizeConfig, PassConfig, QuantConfig
from .engine import Engine, EngineFull, SamplingParams
from .memory import InsufficientMemoryError
from .runtime import CapacityError, OptimizedModel

__version__ = "0.1.0"

__all__ = [
    "BundleError", "export", "load",
    "CacheConfig", "CapacityError", "Engine", "InsufficientMemoryError", "EngineFull", "SamplingParams", "OptimizeConfig", "OptimizedModel", "PassConfig", "QuantConfig",
    "UnsupportedModelError", "default_max_seq_len", "optimize", "__version__",
]
