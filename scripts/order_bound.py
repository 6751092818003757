"""How much any admission order could gain on a workload, under the engine's step-time model.

Simulates fifo, batchllm and blendserve (host-only, `engine/simulate.py`, host/device overlap on
as in the engine) and prints each one's projected seconds beside `simulate.order_bound`: the
device work no order changes plus the fewest steps any schedule needs. fifo / bound is the most
any order could gain over fifo.

  python scripts/order_bound.py --workloads=blend_gen_summarize_clustered,blend_mix3_clustered \\
      --scale=0.5 --max_num_batched_tokens=16384 --max_num_seqs=1024 --num_pages=51608
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_list("workloads", ["blend_gen_summarize_clustered", "blend_chat_summarize_clustered",
                                "blend_mix3_clustered"], "named workloads (workloads.PRESETS)")
flags.DEFINE_float("scale", 0.5, "scale of each workload")
flags.DEFINE_string("model", "llama-3-8b", "model preset")
flags.DEFINE_string("device", "h200", "device profile of the step-time model")
flags.DEFINE_integer("max_num_batched_tokens", 16384, "token budget a step")
flags.DEFINE_integer("max_num_seqs", 1024, "rows a step")
flags.DEFINE_integer("num_pages", 51608, "KV pages (the H200's for Llama-3-8B at default sizes)")
flags.DEFINE_integer("max_model_len", 4608, "prompt + output tokens per request")
flags.DEFINE_integer("token_bucket_mid_from", 256, "1.5x token buckets from here (0: off)")
flags.DEFINE_integer("token_bucket_quarter_from", 8192, "1.25x / 1.75x token buckets from here "
                     "(0: off)")
flags.DEFINE_string("out", "", "JSON output")


def main(argv):
    del argv
    from jaxserve.config import EngineConfig
    from jaxserve.engine.cost_model import StepCosts, device_profile
    from jaxserve.engine.simulate import CANDIDATES, order_bound, simulate
    from jaxserve.runner.buckets import BucketSet
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.scheduler import Sample
    from jaxserve.scheduler.density import DensityModel
    from jaxserve.tools import workloads
    from jaxserve.weights.presets import load_preset

    cfg = load_preset(FLAGS.model)
    costs = StepCosts.make(device_profile(FLAGS.device), cfg)
    b, r = FLAGS.max_num_batched_tokens, FLAGS.max_num_seqs
    ec = EngineConfig(max_num_batched_tokens=b, max_num_seqs=r, max_model_len=FLAGS.max_model_len,
                      num_pages=FLAGS.num_pages, token_bucket_mid_from=FLAGS.token_bucket_mid_from,
                      token_bucket_quarter_from=FLAGS.token_bucket_quarter_from)
    buckets = BucketSet.make(b, r, -(-FLAGS.max_model_len // 16),
                             mid_from=FLAGS.token_bucket_mid_from,
                             quarter_from=FLAGS.token_bucket_quarter_from)
    rows = []
    for name in FLAGS.workloads:
        reqs = workloads.preset(name, vocab_size=cfg.vocab_size, scale=FLAGS.scale)
        outs = [q["max_tokens"] for q in reqs]
        rec = dict(workload=name, scale=FLAGS.scale)
        for pol in CANDIDATES:
            samples = [Sample(prompt_ids=q["prompt_token_ids"], index=i, request=i,
                              params=SamplingParams(max_tokens=q["max_tokens"], ignore_eos=True),
                              max_len=FLAGS.max_model_len) for i, q in enumerate(reqs)]
            res = simulate(samples, pol, ec, cfg, costs, num_pages=FLAGS.num_pages,
                           buckets=buckets, fused_decode_steps=8,
                           density=DensityModel.for_model(cfg), overlap=True)
            rec[pol] = round(res.seconds, 2)
            rec[f"{pol}_bound"] = round(order_bound(res, costs, budget=b, max_rows=r,
                                                    output_lens=outs), 2)
        rec["most_any_order_gains_over_fifo"] = round(rec["fifo"] / rec["fifo_bound"], 3)
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(dict(settings=FLAGS.flag_values_dict(), rows=rows), f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
