"""jaxserve: a JAX/Pallas engine for large offline batched LLM inference."""
import re as _re
import warnings as _warnings

from jaxserve.engine.outputs import RequestMetrics, RequestOutput, SampleOutput
from jaxserve.sampling_params import InvalidRequest, SamplingParams

# The JAX versions the Pallas kernels are tested on: CI's 0.10.2 and the GPU machine's 0.11.2
# (pyproject.toml declares the same range). Pallas changes between minor versions (pl.load/store
# went in 0.9, the Triton lowering is deprecated in 0.11), so an untested one is worth a warning.
TESTED_JAX = ((0, 10, 2), (0, 12, 0))   # [low, high)
TESTED_JAX_TEXT = "jax>=0.10.2,<0.12 (CI: 0.10.2, GPU: 0.11.2)"


def _jax_version_warning(version: str):
    """The warning for an installed jax `version` outside the tested range, or None."""
    m = _re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    if m is None:
        return None
    v = tuple(int(x or 0) for x in m.groups())
    if TESTED_JAX[0] <= v < TESTED_JAX[1]:
        return None
    return (f"jaxserve is tested with {TESTED_JAX_TEXT}; jax {version} is installed, whose Pallas "
            "API may differ (kernels may fail to lower or be slower)")


def _check_jax_version() -> None:
    # importlib.metadata reads the installed version without importing jax (which is slow).
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:   # pragma: no cover
        return
    try:
        msg = _jax_version_warning(version("jax"))
    except PackageNotFoundError:
        return
    if msg:
        _warnings.warn(msg, RuntimeWarning, stacklevel=2)


_check_jax_version()


def __getattr__(name):
    # LLM pulls in the model and weight loaders; import it lazily so `import jaxserve` stays cheap.
    if name == "LLM":
        from jaxserve.api import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "SampleOutput",
           "InvalidRequest"]
