"""The compiled programs of a runner: one key type, one compile path, one lookup.

A program is one jitted step function (`decode_loop.step_program`) specialised by a `ProgramKey`:
its token and page-table buckets, how many decode steps it fuses, and which sampling extras it
computes. Every program a run can reach is compiled before its first step (`ProgramSet.compile`:
lowering in turn, XLA compiles in parallel threads, a progress callback), so a run never
compiles mid-way; `pick` finds the smallest compiled program that fits a step, and a step that
fits none is a bug, not a compile.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import os
import time
from typing import Callable, Iterable, Optional

# Inference programs have no backward pass to trade memory for, and XLA's rematerialization pass
# counts the donated KV cache twice (input and output), finds the program "over" device memory and
# spends ~10 s per program failing to shrink it (H100, unrolled Llama-3-8B: 122 s for 12 programs).
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "rematerialization"}
# XLA GPU command buffers (CUDA graphs) off: every step launches its program with new buffer
# addresses (fresh inputs, the donated KV cache), which a graph must be updated for; on the H200
# the no-sharing benchmark ran 3 % faster without them (benchmarks/README.md, call E).
NO_COMMAND_BUFFERS = {"xla_gpu_enable_command_buffer": ""}


def compiler_options(platform: str, command_buffers: bool) -> dict:
    """The options every step program is compiled with on `platform`."""
    if platform == "gpu" and not command_buffers:
        return {**COMPILER_OPTIONS, **NO_COMMAND_BUFFERS}
    return dict(COMPILER_OPTIONS)


@dataclasses.dataclass(frozen=True, order=True)
class Features:
    """What a program computes beyond the forward pass and the argmax (static: part of its key).
    `stochastic`, `filters` and `groups` are the batch's modes, shared by all its programs; the
    other fields are the extras, compiled into the programs of the steps that have rows asking
    for them."""

    logprobs: bool = False          # top-k + sampled-token logprobs of each sampling row
    prompt_logprobs: bool = False   # logprobs at every token row
    hist_width: int = 0             # W of the penalty history; 0 = no penalties
    stochastic: bool = False        # some row draws (temperature > 0); False: argmax only
    filters: bool = False           # some drawing row sets top-k, top-p or min-p
    # Some rows of the batch may share a prefix, so steps hand their groups to attention (the
    # GPU kernel's host-built work list, one row block size for all items). False when no two
    # prompts share a page: the device builds the list per step, with decode-sized items.
    groups: bool = True

    @property
    def plain(self) -> bool:
        """No extras (the sampling mode aside)."""
        return not (self.logprobs or self.prompt_logprobs or self.hist_width)

    def base(self) -> "Features":
        """The same sampling mode without extras: the programs of steps no row asks extras of."""
        return Features(stochastic=self.stochastic, filters=self.filters, groups=self.groups)

    def for_decode_block(self) -> "Features":
        """A fused block only decodes: no prompt positions to score."""
        return dataclasses.replace(self, prompt_logprobs=False)


PLAIN = Features()


@dataclasses.dataclass(frozen=True, order=True)
class ProgramKey:
    tokens: int                     # T: token bucket
    pages: int                      # P: page-table width bucket
    steps: int = 1                  # decode steps fused into the program (1: a single step)
    features: Features = PLAIN

    def __str__(self) -> str:
        f = "" if self.features == PLAIN else f" {self.features}"
        return f"T={self.tokens} P={self.pages} steps={self.steps}{f}"


class ExecutableCache:
    """Compiled programs on disk, keyed by a fingerprint of everything that shapes them (the
    runner's `fingerprint(key)`: the program key, the model's structure and shapes, the runner's
    static settings, the source of jaxserve and pallas_kernels, JAX's version and the devices).
    A hit skips tracing and lowering as well as XLA's compile, which JAX's own persistent cache
    cannot: tracing an unrolled 32-layer model costs seconds per program. Like JAX's cache, the
    folder is trusted (its files are loaded as executables)."""

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)

    def _path(self, fingerprint: str) -> str:
        return os.path.join(self.folder, fingerprint + ".bin")

    def load(self, fingerprint: str):
        import pickle

        from jax.experimental import serialize_executable

        try:
            with open(self._path(fingerprint), "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            return serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001  (a stale or torn entry costs a compile, never the run)
            return None

    def save(self, fingerprint: str, compiled) -> None:
        import pickle
        import tempfile

        from jax.experimental import serialize_executable

        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, self._path(fingerprint))
        except Exception:  # noqa: BLE001  (a full disk or an unserialisable program: no entry)
            pass


def source_fingerprint() -> str:
    """Hash of the source every program is built from (a code change must never load a stale
    program)."""
    import hashlib

    h = hashlib.sha256()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for pkg in ("jaxserve", "pallas_kernels"):
        for d, dirs, files in sorted(os.walk(os.path.join(root, pkg))):
            dirs.sort()
            for f in sorted(files):
                if f.endswith(".py"):
                    with open(os.path.join(d, f), "rb") as fh:
                        h.update(f.encode() + fh.read())
    return h.hexdigest()


class ProgramSet:
    def __init__(self, lower: Callable[[ProgramKey], object],
                 fingerprint: Optional[Callable[[ProgramKey], str]] = None,
                 cache: Optional[ExecutableCache] = None,
                 options: Optional[dict] = None):
        self._lower = lower          # key -> jax Lowered
        self._options = dict(COMPILER_OPTIONS if options is None else options)
        self._fingerprint = fingerprint
        self._cache = cache if fingerprint is not None else None
        self._compiled: dict[ProgramKey, object] = {}
        self.compile_seconds = 0.0
        self.cache_hits = 0          # programs loaded from the executable cache

    def __len__(self) -> int:
        return len(self._compiled)

    def __contains__(self, key: ProgramKey) -> bool:
        return key in self._compiled

    def keys(self) -> list[ProgramKey]:
        return sorted(self._compiled)

    def compile(self, keys: Iterable[ProgramKey],
                progress: Optional[Callable[[int, int, float], None]] = None) -> int:
        """Compile the keys not compiled yet; returns how many were compiled. Lowering (Python
        tracing) runs here one after another; XLA's compiles, which release the GIL, run in
        parallel threads (H100, unrolled Llama-3-8B: ~8 s a program). `progress(done, total,
        seconds)` is called after each."""
        todo = sorted(set(k for k in keys if k not in self._compiled))
        if not todo:
            return 0
        t0 = time.perf_counter()
        done = 0
        prints = {}
        if self._cache is not None:
            for k in list(todo):
                prints[k] = self._fingerprint(k)
                exe = self._cache.load(prints[k])
                if exe is not None:
                    self._compiled[k] = exe
                    self.cache_hits += 1
                    done += 1
                    if progress is not None:
                        progress(done, len(todo), time.perf_counter() - t0)
            missing = [k for k in todo if k not in self._compiled]
        else:
            missing = todo

        def compile_one(key_lowered):
            key, lowered = key_lowered
            exe = lowered.compile(compiler_options=self._options)
            if self._cache is not None:
                self._cache.save(prints[key], exe)
            return key, exe

        workers = max(1, min(len(missing), 8, (os.cpu_count() or 2) // 2))
        with cf.ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(compile_one, (k, self._lower(k))) for k in missing]
            for fut in cf.as_completed(futures):
                key, exe = fut.result()
                self._compiled[key] = exe
                done += 1
                if progress is not None:
                    progress(done, len(todo), time.perf_counter() - t0)
        self.compile_seconds += time.perf_counter() - t0
        return len(todo)

    def covering(self, key: ProgramKey) -> Optional[ProgramKey]:
        """The narrowest compiled program that can run every step `key` would (same tokens,
        steps and features, a page table at least as wide), or None."""
        fits = [k for k in self._compiled if k.tokens == key.tokens and k.steps == key.steps
                and k.features == key.features and k.pages >= key.pages]
        return min(fits) if fits else None

    def pick(self, tokens: int, pages: int, steps: int, features: Features) -> ProgramKey:
        """The smallest compiled program with this token bucket, step count and features whose
        page-table width holds `pages`."""
        key = self.covering(ProgramKey(tokens, pages, steps, features))
        if key is None:
            raise RuntimeError(f"no compiled program for T={tokens} P>={pages} steps={steps} "
                               f"{features}: the run's compile set missed a reachable step")
        return key

    def __getitem__(self, key: ProgramKey):
        return self._compiled[key]


_OFF = ("", "off", "none", "false", "0")


def enable_compilation_cache(setting: str = "auto") -> Optional[str]:
    """Turn on JAX's persistent compilation cache (process-wide), so a second run of the same
    programs loads them instead of compiling. `setting`: "auto" ($JAXSERVE_COMPILATION_CACHE_DIR,
    else ~/.cache/jaxserve/xla, unless JAX already has a cache folder), a folder, or "off".
    Returns the folder in use, or None."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    if setting == "auto":
        current = jax.config.jax_compilation_cache_dir
        if current and jax.config.jax_enable_compilation_cache:
            return current
        setting = os.environ.get("JAXSERVE_COMPILATION_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "jaxserve", "xla")
    if setting.strip().lower() in _OFF:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    import logging

    # Resetting JAX's cache logs a line at INFO that says nothing to a user.
    logging.getLogger("jax._src.compilation_cache").setLevel(logging.WARNING)
    path = os.path.abspath(os.path.expanduser(setting))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return None          # an unwritable cache folder costs compile time, never the run
    if not jax.config.jax_enable_compilation_cache:
        jax.config.update("jax_enable_compilation_cache", True)
        cc.reset_cache()
    if jax.config.jax_compilation_cache_dir != path:
        jax.config.update("jax_compilation_cache_dir", path)
        # Every program counts: on 2 CPU cores even the small ones add up to a minute.
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        cc.reset_cache()     # the cache may have been initialised (disabled) by an earlier compile
    return path


class CompileEvents:
    """Counts XLA compiles and persistent-cache hits while active (jax.monitoring listeners)."""

    def __init__(self):
        self.compiles = 0
        self.cache_hits = 0
        self.active = False

    def _duration(self, event, duration, **kw):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.compiles += 1

    def _event(self, event, **kw):
        if self.active and event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def __enter__(self):
        import jax

        self.active = True
        jax.monitoring.register_event_duration_secs_listener(self._duration)
        jax.monitoring.register_event_listener(self._event)
        return self

    def __exit__(self, *exc):
        import jax

        self.active = False
        jax.monitoring.unregister_event_duration_listener(self._duration)
        jax.monitoring.unregister_event_listener(self._event)
        return False
