"""The scripts' engine flags, derived from `EngineConfig` (the one definition of every engine
setting: its fields' names, defaults, help and choices), and the mapping back onto `LLM(...)`."""
from __future__ import annotations

import dataclasses
import typing

from absl import flags

from jaxserve.config import EngineConfig


def _kind(f: dataclasses.Field) -> type:
    hint = typing.get_type_hints(EngineConfig)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def define_engine_flags(**defaults) -> None:
    """One absl flag per EngineConfig field; `defaults` overrides a field's default for this script
    (e.g. a benchmark's larger step budget)."""
    unknown = set(defaults) - {f.name for f in dataclasses.fields(EngineConfig)}
    if unknown:
        raise ValueError(f"not engine settings: {sorted(unknown)}")
    for f in dataclasses.fields(EngineConfig):
        default = defaults.get(f.name, f.default)
        help_ = f.metadata.get("help", f.name)
        choices = f.metadata.get("choices")
        kind = _kind(f)
        if choices:
            flags.DEFINE_enum(f.name, default, list(choices), help_)
        elif kind is bool:
            flags.DEFINE_bool(f.name, default, help_)
        elif kind is int:
            flags.DEFINE_integer(f.name, default, help_)
        elif kind is float:
            flags.DEFINE_float(f.name, default, help_)
        else:
            flags.DEFINE_string(f.name, default, help_)


def engine_kwargs(FLAGS) -> dict:
    """`LLM(...)` keyword arguments from the flags defined above."""
    return {f.name: FLAGS[f.name].value for f in dataclasses.fields(EngineConfig)}


def define_sampling_default_flags() -> None:
    """The batch scripts' defaults for requests that do not set their own sampling fields."""
    flags.DEFINE_integer("max_tokens", 64, "default max_tokens per request")
    flags.DEFINE_float("temperature", 0.0, "default temperature (0 = greedy)")
    flags.DEFINE_float("top_p", 1.0, "default top_p")
    flags.DEFINE_integer("top_k", -1, "default top_k (-1 = off)")
    flags.DEFINE_float("min_p", 0.0, "default min_p")
    flags.DEFINE_bool("ignore_eos", False, "generate max_tokens regardless of EOS")


def sampling_defaults(FLAGS) -> dict:
    """`SamplingParams` keyword arguments from the flags `define_sampling_default_flags` defines."""
    return {k: FLAGS[k].value for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p",
                                        "ignore_eos")}


def define_distributed_flags() -> None:
    """--coordinator_address / --num_processes / --process_id: a multi-process (multi-host) run,
    joined by `jaxserve.runner.distributed.initialize` (unset: one process, or the
    JAXSERVE_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID environment variables)."""
    flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0's "
                        "coordinator (the same on every process)")
    flags.DEFINE_integer("num_processes", None, "multi-host: number of processes (one per host)")
    flags.DEFINE_integer("process_id", None, "multi-host: this process's index, 0 .. "
                         "num_processes - 1 (process 0 writes the outputs)")


def initialize_distributed(FLAGS) -> bool:
    """Join the multi-process run the flags describe (before JAX initialises its devices)."""
    from jaxserve.runner import distributed

    return distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id)
