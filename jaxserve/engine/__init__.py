"""The engine: requests in, outputs out, one model on one device (`Engine.run`).

engine.py (the loop), requests.py (prompt -> request, validation, n samples), outputs.py (what a
request returns, assembled as samples finish), stats.py (a run's counters), sizing.py (start-up
decisions). Names are imported lazily so `import jaxserve` stays cheap.
"""

_NAMES = {"Engine": "engine", "Request": "requests", "RequestOutput": "outputs",
          "RequestMetrics": "outputs", "SampleOutput": "outputs"}


def __getattr__(name):
    if name in _NAMES:
        import importlib

        return getattr(importlib.import_module(f"jaxserve.engine.{_NAMES[name]}"), name)
    raise AttributeError(name)


__all__ = list(_NAMES)
