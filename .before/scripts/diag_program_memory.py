"""Memory of one compiled step program (argument / output / alias / temp bytes) and the large
copies in its optimised HLO, for the layer-loop variants; with --execute, one real step. Written
to chase the unrolled loop's 19.23 GiB out-of-memory error with a memory-filling KV cache, which
it showed (session 3) to be the V cache's own `jnp.zeros` failing on a fragmented pool, not the
step program (fixed in `LlamaForCausalLM.unstack_layers`).

  python3 scripts/diag_program_memory.py --num_pages=3000 --tokens=2048
"""
from __future__ import annotations

import os
import re
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "llama-3-8b", "preset")
flags.DEFINE_integer("num_pages", 3000, "KV pages per layer")
flags.DEFINE_integer("tokens", 2048, "token bucket to compile")
flags.DEFINE_list("variants", ["scan", "unrolled", "unrolled+nocond"], "variants")
flags.DEFINE_string("dump", "", "write each variant's optimised HLO here")
flags.DEFINE_bool("execute", False, "also run one 1785-token prefill step (3 requests, 1 token each) through the engine")
flags.DEFINE_integer("show", 40, "KV-shaped HLO lines to print")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from jaxserve import LLM
    from jaxserve.runner import model_runner

    orig_copy = model_runner.ModelRunner._copy_pages

    def copy_nocond(self, k_cache, v_cache, src, dst):
        offs = (jnp.arange(self.cfg.num_layers, dtype=jnp.int32) * self.num_pages)[:, None]
        s_all = (offs + src[None, :]).reshape(-1)
        d_all = (offs + dst[None, :]).reshape(-1)
        return (k_cache.at[:, d_all].set(k_cache[:, s_all]),
                v_cache.at[:, d_all].set(v_cache[:, s_all]))

    for v in FLAGS.variants:
        loop, _, opt = v.partition("+")
        model_runner.ModelRunner._copy_pages = copy_nocond if opt == "nocond" else orig_copy
        llm = LLM(FLAGS.model, load_format="dummy", num_pages=FLAGS.num_pages or None,
                  max_num_batched_tokens=FLAGS.tokens, max_num_seqs=256, max_model_len=2432,
                  compile_on_init=False, layer_loop=loop, fused_decode_steps=1)
        r = llm.engine.runner
        key = max(r.buckets.all())
        exe = r.compile(key)
        ma = exe.memory_analysis()
        gib = 2 ** 30
        print(f"{v:18s} bucket {key} kv {r.kv_bytes / gib:.2f} GiB  args {ma.argument_size_in_bytes / gib:.2f}"
              f"  out {ma.output_size_in_bytes / gib:.2f}  alias {ma.alias_size_in_bytes / gib:.2f}"
              f"  temp {ma.temp_size_in_bytes / gib:.3f} GiB", flush=True)
        txt = exe.as_text()
        if FLAGS.dump:
            os.makedirs(FLAGS.dump, exist_ok=True)
            with open(os.path.join(FLAGS.dump, f"{v}.hlo.txt"), "w") as f:
                f.write(txt)
        kv_dims = f"{llm.model_config.num_kv_heads},{FLAGS.num_pages * llm.model_config.num_layers}"
        if FLAGS.execute:
            # One real run: does the step allocate more than the analysis says?
            try:
                # Is each KV buffer really there (memory in use was one KV buffer short before the
                # failing first step, session 2)?
                jax.block_until_ready((r.k_cache, r.v_cache))
                print(f"    k/v buffers distinct: "
                      f"{r.k_cache.unsafe_buffer_pointer() != r.v_cache.unsafe_buffer_pointer()}, "
                      f"deleted: {r.k_cache.is_deleted()}/{r.v_cache.is_deleted()}", flush=True)
                st = jax.devices()[0].memory_stats() or {}
                print(f"    before run: in use {st.get('bytes_in_use', 0) / gib:.2f} GiB of "
                      f"{st.get('bytes_limit', 0) / gib:.2f} GiB", flush=True)
                from jaxserve import SamplingParams
                llm.generate([{"prompt_token_ids": list(range(5 + 1000 * i, 600 + 1000 * i))} for i in range(3)],
                             SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
                             use_tqdm=False)
                st = jax.devices()[0].memory_stats() or {}
                print(f"    run ok; peak {st.get('peak_bytes_in_use', 0) / gib:.2f} GiB", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"    run FAILED: {str(e).splitlines()[0][:200]}", flush=True)
        shown = 0
        for line in txt.splitlines():
            head = line.split("(", 1)[0]
            if kv_dims in head and shown < FLAGS.show and not line.strip().startswith("ENTRY"):
                print("   ", line.strip()[:200])
                shown += 1
        del llm, r, exe
        jax.clear_caches()


if __name__ == "__main__":
    app.run(main)
