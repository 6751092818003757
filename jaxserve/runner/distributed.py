"""Multi-host runs: one process per host, the same script everywhere, joined by
`jax.distributed.initialize` before JAX initialises its devices; `jax.devices()` then lists every
process's devices and a tensor-parallel mesh may span them.

    # on each of 2 hosts (process_id 0 on the coordinator host, 1 on the other):
    python scripts/run_batch.py --model=... --input=in.jsonl --output=out.jsonl \\
        --tensor_parallel_size=16 --coordinator_address=host0:1234 --num_processes=2 \\
        --process_id=0

The same settings come from $JAXSERVE_COORDINATOR_ADDRESS, $JAXSERVE_NUM_PROCESSES and
$JAXSERVE_PROCESS_ID. Every process runs the same deterministic host-side schedule on the same
input, so every process builds the same step inputs; only process 0 writes outputs.
"""
from __future__ import annotations

import os
from typing import Optional

ENV = {"coordinator_address": "JAXSERVE_COORDINATOR_ADDRESS",
       "num_processes": "JAXSERVE_NUM_PROCESSES",
       "process_id": "JAXSERVE_PROCESS_ID"}


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
    """Join the multi-process run the arguments (else the environment) describe; returns whether
    there is one. Call before anything initialises JAX's devices. Nothing given: a single
    process, nothing done."""
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"]) or None
    if num_processes is None and os.environ.get(ENV["num_processes"]):
        num_processes = int(os.environ[ENV["num_processes"]])
    if process_id is None and os.environ.get(ENV["process_id"]):
        process_id = int(os.environ[ENV["process_id"]])
    if coordinator_address is None and num_processes in (None, 1):
        return False
    if coordinator_address is None or num_processes is None or process_id is None:
        raise ValueError("a multi-process run needs coordinator_address, num_processes and "
                         f"process_id (got {coordinator_address!r}, {num_processes!r}, "
                         f"{process_id!r})")
    import jax

    # CPU processes (tests) reduce over gloo; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    return True


def process_index() -> int:
    import jax

    return jax.process_index()


def is_main_process() -> bool:
    """The process that writes outputs (process 0)."""
    return process_index() == 0


def agree_min(value: int) -> int:
    """The smallest of every process's `value` (e.g. KV pages: every process must size the same
    cache); `value` itself in a single-process run."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int32(value))))


def broadcast_from_main(value):
    """Process 0's numpy `value` on every process (e.g. which requests an earlier run finished:
    only process 0 reads the results log)."""
    import jax

    if jax.process_count() == 1:
        return value
    import numpy as np
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(value))
