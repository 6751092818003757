"""jaxserve: a JAX/Pallas engine for large offline batched LLM inference."""
from jaxserve.outputs import RequestMetrics, RequestOutput
from jaxserve.sampling_params import InvalidRequest, SamplingParams


def __getattr__(name):
    # LLM pulls in the model and weight loaders; import it lazily so `import jaxserve` stays cheap.
    if name == "LLM":
        from jaxserve.api import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "RequestOutput", "RequestMetrics", "InvalidRequest"]
