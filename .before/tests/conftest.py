import os

import jax
import pytest

# Tests compare float32 logits against PyTorch: keep XLA's float32 matmuls exact everywhere.
jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """kind -> (checkpoint dir, torch model); built lazily, once per session."""
    from tests import tiny_models as tm

    root = str(tmp_path_factory.mktemp("tiny_models"))
    cache = {}

    class _Lazy(dict):
        def __missing__(self, kind):
            cache[kind] = tm.build(kind, root)
            self[kind] = cache[kind]
            return cache[kind]

    return _Lazy()
