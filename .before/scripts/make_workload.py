"""Write a deterministic synthetic workload as JSONL (run_batch's format, token ids).

  python scripts/make_workload.py --workload=batchllm --scale=0.25 --vocab_size=128256 --output=w.jsonl
  python scripts/make_workload.py --family=groups --num_groups=8 --share=4 --shared_len=512 ...
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from jaxserve import workloads  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("workload", None, f"named workload: {', '.join(workloads.PRESETS)}")
flags.DEFINE_float("scale", 1.0, "scale the number of requests/groups of a named workload")
flags.DEFINE_string("family", None, "nosharing | groups | document | system | mixed (custom)")
flags.DEFINE_integer("vocab_size", 128256, "token ids are drawn below this")
flags.DEFINE_integer("seed", 0, "random seed")
flags.DEFINE_string("output", "workload.jsonl", "output JSONL")
for name in ("num_requests", "input_len", "output_len", "num_groups", "share", "shared_len",
             "unique_len", "num_docs", "questions", "doc_len", "question_len", "system_len",
             "short_in", "long_out", "long_in", "short_out"):
    flags.DEFINE_integer(name, None, f"custom family parameter {name}")


def main(argv):
    del argv
    if FLAGS.workload:
        reqs = workloads.preset(FLAGS.workload, vocab_size=FLAGS.vocab_size, scale=FLAGS.scale,
                                seed=FLAGS.seed)
    elif FLAGS.family:
        kw = {}
        for name in ("num_requests", "input_len", "output_len", "num_groups", "share", "shared_len",
                     "unique_len", "num_docs", "questions", "doc_len", "question_len", "system_len",
                     "short_in", "long_out", "long_in", "short_out"):
            if FLAGS[name].value is not None:
                kw[name] = FLAGS[name].value
        reqs = workloads.generate(FLAGS.family, vocab_size=FLAGS.vocab_size, seed=FLAGS.seed, **kw)
    else:
        raise app.UsageError("give --workload=NAME or --family=FAMILY with its parameters")
    with open(FLAGS.output, "w") as f:
        for r in reqs:
            f.write(json.dumps(r) + "\n")
    n_in = sum(len(r["prompt_token_ids"]) for r in reqs)
    n_out = sum(r["max_tokens"] for r in reqs)
    print(f"wrote {len(reqs)} requests ({n_in} prompt tokens, {n_out} output tokens) to {FLAGS.output}")


if __name__ == "__main__":
    app.run(main)
