"""Tensor parallelism on 8 CPU devices. Run by tests/test_tensor_parallel.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts (the rest of the suite
sees one device); skipped where only one device is visible. On a machine of several GPUs,
`python -m pytest tests/tp_multidevice.py` runs the cases that fit its devices through the
compiled GPU kernel.

TP = 2 and 4 against TP = 1 and transformers (greedy tokens and float32 logits) over chunked
prefill, shared-prefix groups and fused decode blocks, on both layer loops; every device holds
1 / N of the split weights and of the KV cache; the Pallas kernels run on local heads under
shard_map; a model whose heads do not divide fails with a clear error. TP = 2 x DP = 2 and 4
through `LLM`: each replica's weights, KV cache and programs on its own 2 devices, taken from one
load without a copy.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P

if jax.device_count() < 2:
    pytest.skip("needs several devices: run through tests/test_tensor_parallel.py",
                allow_module_level=True)

import pallas_kernels  # noqa: E402
from jaxserve.config import ConfigError, EngineConfig, ModelConfig  # noqa: E402
from jaxserve.engine import Engine  # noqa: E402
from jaxserve.runner import mesh as mesh_mod  # noqa: E402
from jaxserve.weights.assemble import build_model, dummy_model  # noqa: E402
from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint  # noqa: E402
from tests.step_spy import watch_results  # noqa: E402
from tests.test_engine import hf_greedy  # noqa: E402
from tests.test_prefix_sharing import groups_workload, no_sharing_workload  # noqa: E402

ON_GPU = jax.default_backend() == "gpu"

# The smallest shapes that still chunk prefills (16-token budget, 45-token shared prefixes),
# share prefixes and fuse decode blocks; one token bucket and one page-table width: 2 programs
# per engine.
SETTINGS = dict(page_size=8, max_num_batched_tokens=16, max_num_seqs=8, max_model_len=128,
                num_pages=64, attention_impl="pallas_gpu" if ON_GPU else "reference",
                compilation_cache_dir="off", page_bucket_growth=1, fused_decode_steps=4)


def devices(n):
    return pytest.mark.skipif(jax.device_count() < n, reason=f"needs {n} devices")

# Split params: axis split -> expected spec (stacked layout); the rest replicated.
SPLIT = {"qkv_proj": P(None, None, "tp"), "qkv_bias": P(None, "tp"),
         "gate_up_proj": P(None, None, "tp"), "o_proj": P(None, "tp", None),
         "down_proj": P(None, "tp", None), "embed": P("tp", None), "lm_head": P(None, "tp")}


def load_engine(path, tp, **kw):
    cfg = ModelConfig.from_json_file(f"{path}/config.json")
    ck = SafetensorsCheckpoint(path)
    mesh = mesh_mod.make_mesh(tp) if tp > 1 else None
    model = build_model(cfg, ck.get, jnp.float32, ck.where, mesh=mesh)
    eng = Engine(cfg, model, EngineConfig(**{**SETTINGS, "tensor_parallel_size": tp, **kw}),
                 return_logits=True, mesh=mesh)
    steps = []     # (plan, logits) of each single step; fused blocks return no logits
    watch_results(eng.runner, lambda plan, res: res.logits is not None and
                  steps.append((plan, res.logits)))
    return eng, steps


def assert_sharded(eng, tp):
    """Every split parameter and the KV cache: 1 / tp per device, on the expected axis."""
    n_split = 0
    for path, var in jax.tree_util.tree_flatten_with_path(eng.runner.params)[0]:
        name = mesh_mod.param_name(path)
        arrays = var if isinstance(var, (tuple, list)) else [var]
        for a in arrays:
            shards = a.addressable_shards
            assert len(shards) == tp, name
            want = SPLIT.get(name)
            if want is not None and a.ndim < len(want):       # one layer's array (unrolled)
                want = P(*want[1:])
            if want is None:
                assert all(s.data.nbytes == a.nbytes for s in shards), name
            else:
                assert a.sharding.spec == want, (name, a.sharding.spec)
                assert all(s.data.nbytes * tp == a.nbytes for s in shards), name
                n_split += 1
    assert n_split >= 5          # q/k/v, o, gate/up, down, the vocabulary (+ bias, lm_head)
    for kv in (eng.runner.k_cache, eng.runner.v_cache):
        assert kv.sharding.spec == mesh_mod.kv_spec()
        assert all(s.data.nbytes * tp == kv.nbytes for s in kv.addressable_shards)
    assert eng.runner.kv_bytes_per_device * tp == eng.runner.kv_bytes
    # Attention runs on each device's own heads.
    cfg = eng.cfg
    assert (eng.attention.num_q_heads, eng.attention.num_kv_heads) == (
        cfg.num_heads // tp, cfg.num_kv_heads // tp)


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("kind,tp,loop", [
    ("llama3", 2, "scan"), ("qwen2", 2, "unrolled"),
    pytest.param("tied", 4, "scan", marks=devices(4))])
def test_tensor_parallel_equals_one_device_and_transformers(kind, tp, loop, tiny_models):
    path, hf = tiny_models[kind]
    reqs = groups_workload(np.random.default_rng(13), n_groups=3, share=3, shared_len=45,
                           unique_len=9, out_len=10)
    one, one_steps = load_engine(path, 1, layer_loop=loop)
    par, par_steps = load_engine(path, tp, layer_loop=loop)
    assert_sharded(par, tp)
    out1 = one.run(reqs)
    outp = par.run(reqs)
    st = par.last_stats
    assert st.computed_prefill_tokens == st.optimal_prefill_tokens < 0.6 * st.prompt_tokens
    assert st.fused_blocks > 0 and st.num_steps > 5
    assert max(len(r.prompt_ids) for r in reqs) > SETTINGS["max_num_batched_tokens"]
    for r, a, b in zip(reqs, out1, outp):
        assert a.token_ids == b.token_ids == hf_greedy(hf, r), r.request_id
    # The same schedule, step for step: logits within float32 reduction-order noise of TP = 1,
    # and of transformers at every sampled row.
    assert len(one_steps) == len(par_steps) > 3
    seqs = {}
    for (plan1, lg1), (plan, lg) in zip(one_steps, par_steps):
        assert [r.end for r in plan1.rows] == [r.end for r in plan.rows]
        assert rel(lg, lg1) < 1e-5
        for row, owner, lrow in zip(plan.rows, plan.owners, lg):
            if row.samples:
                seqs.setdefault(id(owner), (owner, []))[1].append((row.end - 1, lrow))
    worst = 0.0
    for owner, rows in seqs.values():
        with torch.no_grad():
            ref = hf(torch.tensor([owner.prompt_ids + owner.output_ids])).logits[0].double().numpy()
        for pos, lrow in rows:
            worst = max(worst, rel(lrow, ref[pos]))
    assert worst < 1e-4, worst


@devices(4)
def test_heads_that_do_not_divide_are_a_clear_error(tiny_models):
    from jaxserve import LLM

    path, _ = tiny_models["mistral"]                  # 4 query heads, 1 KV head
    with pytest.raises(ConfigError, match="num_key_value_heads=1"):
        LLM(path, tensor_parallel_size=2, **SETTINGS)
    path, _ = tiny_models["llama3"]                   # 2 KV heads
    with pytest.raises(ConfigError, match="tensor_parallel_size=4 does not divide "
                                          "num_key_value_heads=2"):
        load_engine(path, 4)


@devices(4)
def test_dummy_weights_are_created_on_their_shards():
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=8, num_kv_heads=4, head_dim=8)
    mesh = mesh_mod.make_mesh(4)
    model = dummy_model(cfg, jnp.float32, seed=1, mesh=mesh)
    qkv = model.layers.qkv_proj.value
    assert qkv.sharding.spec == P(None, None, "tp")
    assert [s.data.shape for s in qkv.addressable_shards] == [(2, 64, (8 + 8) * 8 // 4)] * 4
    assert model.embed.value.addressable_shards[0].data.shape == (128, 64)
    assert float(jnp.std(qkv)) > 0.01


@pytest.mark.parametrize("impl", ["pallas_gpu"] if ON_GPU else ["pallas_gpu_interpret",
                                                                 "pallas_tpu"])
def test_pallas_kernels_on_local_heads_under_shard_map(impl):
    """The kernels run per device on their heads (host-built shared-prefix work list or the
    groups, with the local head counts) and together equal the reference over all heads."""
    from tests.test_kernels import assert_close, make_case, reference_out

    tp = 2
    c = make_case(5, seqs=[(40, 1), (33, 1), (37, 5), (16, 16), (1, 1)],
                  groups=[(16, [0, 1, 2])], page_size=8, hkv=4, g=2, d=64)
    spec = pallas_kernels.AttentionSpec(impl, c.hq // tp, c.hkv // tp, 64, 8, shared_prefix=True)
    groups = jax.device_get(c.md.groups)
    md = pallas_kernels.host_prepare(jax.device_get(dataclasses.replace(c.md, groups=None)),
                                     groups, spec)
    mesh = mesh_mod.make_mesh(tp)

    def local(q, kc, vc, md):
        md = pallas_kernels.device_prepare(md, spec)
        return pallas_kernels.ragged_paged_attention(q, kc, vc, md, spec=spec,
                                                     page_offset=c.page_offset,
                                                     sm_scale=c.sm_scale)

    heads = P(None, "tp", None)
    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(heads, P("tp"), P("tp"), P()),
                               out_specs=heads, check_vma=False))
    out = fn(c.q, c.k_cache, c.v_cache, md)
    assert_close(out, reference_out(c), c, jnp.float32)


@devices(4)
def test_vocabulary_that_does_not_divide_is_replicated():
    """vocab 390 over 4 devices: the embedding and LM head stay whole on every device (the rest
    is split) and the outputs equal one device's."""
    from jaxserve.engine import Request
    from jaxserve.models.llama import hf_expected_shapes
    from jaxserve.sampling_params import SamplingParams

    cfg = ModelConfig(vocab_size=390, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=4, head_dim=8, max_position_embeddings=128)
    rng = np.random.default_rng(0)
    tensors = {k: (0.3 * rng.standard_normal(s)).astype(np.float32) + ("norm" in k)
               for k, s in hf_expected_shapes(cfg).items()}
    reqs = [Request("a", rng.integers(0, 390, 11).tolist(),
                    SamplingParams(max_tokens=5, temperature=0.0))]
    outs, logits = [], []
    for tp in (1, 4):
        mesh = mesh_mod.make_mesh(tp) if tp > 1 else None
        model = build_model(cfg, tensors.__getitem__, jnp.float32, mesh=mesh)
        eng = Engine(cfg, model, EngineConfig(**{**SETTINGS, "fused_decode_steps": 1,
                                                 "tensor_parallel_size": tp}),
                     return_logits=True, mesh=mesh)
        got = []
        watch_results(eng.runner, lambda plan, res: got.append(res))
        outs.append(eng.run(reqs)[0].token_ids)
        logits.append(np.concatenate([r.logits for r in got]))
        if tp > 1:
            assert model.embed.value.sharding.spec == P(None, None)
            assert model.lm_head.value.addressable_shards[0].data.shape == (32, 390)
            assert model.layers.o_proj.value.addressable_shards[0].data.shape == (1, 8, 32)
    assert outs[0] == outs[1] and len(outs[0]) == 5
    assert rel(logits[1], logits[0]) < 1e-5


def test_sampling_extras_equal_one_device(tiny_models):
    """Seeded temperature sampling, penalties, logprobs and prompt logprobs (logits gathered at
    every prompt row) on the gathered logits: as on one device."""
    from jaxserve.engine import Request
    from jaxserve.sampling_params import SamplingParams

    path, _ = tiny_models["llama3"]
    rng = np.random.default_rng(2)
    reqs = [Request("s", rng.integers(0, 384, 13).tolist(),
                    SamplingParams(max_tokens=6, temperature=0.9, seed=5, top_p=0.9,
                                   presence_penalty=0.5, logprobs=3, prompt_logprobs=2)),
            Request("g", rng.integers(0, 384, 7).tolist(),
                    SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3))]
    outs = [load_engine(path, tp, fused_decode_steps=1)[0].run(reqs)
            for tp in (1, 2)]
    for a, b in zip(*outs):
        assert a.token_ids == b.token_ids, a.request_id
    s1, s2 = outs[0][0], outs[1][0]
    for d1, d2 in zip(s1.logprobs + s1.prompt_logprobs[1:], s2.logprobs + s2.prompt_logprobs[1:]):
        assert list(d1) == list(d2)
        np.testing.assert_allclose(list(d1.values()), list(d2.values()), rtol=1e-5, atol=1e-5)
    assert len(s1.logprobs) == 6 and len(s1.prompt_logprobs) == 13


@devices(6)
def test_replicas_take_their_shards_of_one_load_without_a_copy():
    """Loaded once over every replica's devices (`replica_mesh`), each replica's model is the
    shards its devices already hold (the same buffers), laid out as a load onto its own mesh;
    loaded over another mesh of 2 devices it is copied onto the shards, to the same values; a
    model loaded for one device (its fused columns in one device's order) is refused."""
    from jaxserve.engine.data_parallel import device_groups
    from jaxserve.models.llama import hf_expected_shapes
    from jaxserve.weights.assemble import place_model_on_mesh

    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=128)
    rng = np.random.default_rng(3)
    tensors = {k: rng.standard_normal(s).astype(np.float32)
               for k, s in hf_expected_shapes(cfg).items()}

    def load(mesh):
        return build_model(cfg, tensors.__getitem__, jnp.float32, mesh=mesh)

    def leaves(model):
        return jax.tree.leaves(nnx.state(model))

    groups = device_groups(jax.devices(), 2, 3)
    loaded = load(mesh_mod.replica_mesh(groups[:2]))
    elsewhere = load(mesh_mod.make_mesh(2, groups[2]))
    held = {(s.device, s.data.unsafe_buffer_pointer())
            for a in leaves(loaded) for s in a.addressable_shards}
    for g in groups[:2]:
        mesh = mesh_mod.make_mesh(2, g)
        want = leaves(load(mesh))
        for placed, copied in ((place_model_on_mesh(loaded, cfg, mesh), False),
                               (place_model_on_mesh(elsewhere, cfg, mesh), True)):
            for a, b in zip(leaves(placed), want):
                assert a.sharding.device_set == set(g) and a.sharding.spec == b.sharding.spec
                assert [s.data.nbytes for s in a.addressable_shards] == [
                    s.data.nbytes for s in b.addressable_shards]
                shared = [(s.device, s.data.unsafe_buffer_pointer()) in held
                          for s in a.addressable_shards]
                assert not any(shared) if copied else all(shared)
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ConfigError, match="needs the model loaded over a mesh of 2 devices"):
        place_model_on_mesh(load(None), cfg, mesh_mod.make_mesh(2, groups[0]))


@pytest.mark.parametrize("dp", [pytest.param(2, marks=devices(4)),
                                pytest.param(4, marks=devices(8))])
def test_tensor_times_data_parallel_equals_one_device(dp, tiny_models):
    """LLM(tensor_parallel_size=2, data_parallel_size=dp): every replica split over its own 2
    devices (weights, KV cache and compiled programs there and nowhere else, 1 / 2 of each split
    array per device), every shared-prefix group on one replica, greedy tokens and prefill work
    as on one device."""
    from jaxserve import LLM

    path, _ = tiny_models["llama3"]
    rng = np.random.default_rng(13)
    reqs = (groups_workload(rng, n_groups=4, share=3, shared_len=45, unique_len=9, out_len=10)
            + no_sharing_workload(rng, 8))
    one, _ = load_engine(path, 1)
    want = [o.token_ids for o in one.run(reqs)]
    eng = LLM(path, tensor_parallel_size=2, data_parallel_size=dp, **SETTINGS).engine
    for rep in eng.replicas:
        assert_sharded(rep, 2)
    assert [o.token_ids for o in eng.run(reqs)] == want

    groups = [set(g) for g in eng.devices]
    assert len(set().union(*groups)) == 2 * dp and all(len(g) == 2 for g in groups)
    for rep, devs in zip(eng.replicas, groups):
        arrays = jax.tree.leaves(rep.runner.params) + [rep.runner.k_cache, rep.runner.v_cache]
        assert all(a.sharding.device_set == devs for a in arrays)
        exes = [rep.runner.programs[k] for k in rep.runner.programs.keys()]
        assert exes and all(s.device_set == devs for e in exes
                            for s in jax.tree.leaves(e.input_shardings))
    # Replicas' executables are cached apart: their fingerprints name their devices.
    assert len({rep.runner._static_fingerprint() for rep in eng.replicas}) == dp

    replica = {i: r for r, part in enumerate(eng.last_partition.parts) for i in part}
    for g in {r.request_id.split("m")[0] for r in reqs if r.request_id.startswith("g")}:
        assert len({replica[i] for i, r in enumerate(reqs)
                    if r.request_id.startswith(g + "m")}) == 1, g
    st = eng.last_stats
    assert st.dp_split_groups == 0 and all(n > 0 for n in st.dp_replica_requests)
    assert st.computed_prefill_tokens == one.last_stats.computed_prefill_tokens
    assert st.mid_run_compiles == 0


@devices(2)
def test_tensor_times_data_parallel_beyond_the_devices_is_a_clear_error(tiny_models):
    from jaxserve import LLM

    path, _ = tiny_models["llama3"]
    n = jax.device_count()
    with pytest.raises(ConfigError, match=rf"tensor_parallel_size=2 x data_parallel_size={n} "
                                          rf"needs {2 * n} devices; {n} are visible"):
        LLM(path, tensor_parallel_size=2, data_parallel_size=n, **SETTINGS)
