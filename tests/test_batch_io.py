"""The batch job's I/O in-process (no model, no compile): bounded line parsing, field ranges,
encodings, the content-keyed resume log, the output lock, path checks and file permissions."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from jaxserve.io import (Hashes, OutputLock, OutputLocked, OutputPathError, PartialRefused,
                         ResultsLog, ResultsLogWriteError, check_output_path, read_batch,
                         write_jsonl_atomic)
from jaxserve.io.jsonl import InputError, check_record, parse_line

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- one line: bounded parsing and field ranges ------------------------------------------------
@pytest.mark.parametrize("text,what", [
    ('{"id": "a", "prompt": "x", "seed": 1' + "0" * 5000 + "}", "field 'seed': an integer of 5001 digits"),
    ("[" * 100000, "nested more than 64 levels"),
    ('{"id": "a", "prompt": "x", "metadata": ' + "[" * 70 + "]" * 70 + "}", "nested more than 64"),
    ('{"id": "a", "prompt": "x", "temperature": NaN}', "field 'temperature': 'NaN' is not JSON"),
    ('{"id": "a", "prompt": "x", "metadata": {"v": 1e999}}', "field 'metadata.v': the number 1e999"),
    ('{"id": "a", "prompt_token_ids": [1], "top_k": 10000000000}', "field 'top_k': must be at most 2147483647"),
    ('{"id": "a", "prompt_token_ids": [1], "max_tokens": 2147483648}', "field 'max_tokens': must be at most"),
    ('{"id": "a", "prompt_token_ids": [1], "min_tokens": 3000000000, "max_tokens": 4}', "field 'min_tokens'"),
    ('{"id": "a", "prompt_token_ids": [1], "n": 5000000000}', "field 'n'"),
    ('{"id": "a", "prompt_token_ids": [1], "stop_token_ids": [3000000000]}', "field 'stop_token_ids': token ids must be at most"),
    ('{"id": "a", "prompt_token_ids": [1], "logprobs": 3000000000}', "field 'logprobs'"),
    ('{"id": "a", "prompt_token_ids": [1], "seed": 18446744073709551616}', "field 'seed': must fit in 64 bits"),
    ('{"id": "a", "prompt_token_ids": [1], "priority": 18446744073709551616}', "field 'priority' must fit in 64 bits"),
    ('{"id": "a", "prompt_token_ids": [1, 3000000000]}', "field 'prompt_token_ids[1]': token id 3000000000"),
    ('{"id": "a", "prompt_token_ids": [1], "temperature": 1e39}', "field 'temperature': is beyond the float32"),
    ('{"id": "a", "prompt_token_ids": [1], "ignore_eos": "yes"}', "field 'ignore_eos': must be true or false"),
    ('{"id": "a", "prompt_token_ids": [1], "stop": 5}', "field 'stop'"),
    ('{"id": "a", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "field 'messages[0].content[0].type': content parts of type 'image_url' are not supported"),
    ('{"id": "a", "messages": [{"role": "user", "content": [{"type": "text"}]}]}', "field 'messages[0].content[0].text'"),
    ('{"id": "a", "messages": [{"role": "user", "content": 5}]}', "field 'messages[0].content'"),
])
def test_hostile_values_are_the_line_error_naming_the_field(text, what):
    item = parse_line(9, text, {})
    assert item.error is not None and item.error.startswith("line 9: ") and what in item.error, item.error


@pytest.mark.parametrize("field", ["id", "metadata", "prompt", "stop", "messages"])
def test_lone_surrogates_are_the_line_error_and_the_record_is_writable(field, tmp_path):
    val = {"id": '"bad\\udc80id"', "metadata": '{"k": "v\\udc80"}', "prompt": '"p\\udc80"',
           "stop": '["s\\udc80"]', "messages": '[{"role": "user", "content": "c\\udc80"}]'}[field]
    obj = {"id": '"x"', "prompt_token_ids": "[1]"}
    if field in ("prompt", "messages"):
        del obj["prompt_token_ids"]
    obj[field] = val
    text = "{" + ", ".join(f'"{k}": {v}' for k, v in obj.items()) + "}"
    item = parse_line(4, text, {})
    assert item.error.startswith("line 4: field '") and "lone surrogate \\udc80" in item.error
    from jaxserve.io import result_record

    rec = result_record(item, None)
    write_jsonl_atomic(str(tmp_path / "o.jsonl"), [rec])   # must not raise
    back = json.loads((tmp_path / "o.jsonl").read_text(encoding="utf-8"))
    assert back["finish_reason"] == "error"
    if field == "id":
        assert back["id"] == "bad\\udc80id" and "escaped" in back["error"]


def test_openai_lines_take_vllm_extras_and_text_parts():
    chat = {"custom_id": "c", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "system", "content": "S"},
                                  {"role": "user", "content": [{"type": "text", "text": "a"},
                                                               {"type": "text", "text": "b"}]}],
                     "top_k": 5, "min_p": 0.1, "min_tokens": 2, "ignore_eos": True,
                     "stop_token_ids": [7], "include_stop_str_in_output": True,
                     "repetition_penalty": 1.1, "prompt_logprobs": 1, "priority": -3,
                     "skip_special_tokens": True, "use_beam_search": False, "best_of": 1}}
    item = parse_line(1, json.dumps(chat), {})
    assert item.error is None, item.error
    assert item.messages[1]["content"] == "a\nb" and item.priority == -3
    p = item.params
    assert (p.top_k, p.min_p, p.min_tokens, p.ignore_eos, p.stop_token_ids, p.prompt_logprobs) == \
        (5, 0.1, 2, True, (7,), 1) and p.include_stop_str_in_output and p.repetition_penalty == 1.1
    for body, what in (({"top_k": 10**10}, "'body.top_k'"),
                       ({"use_beam_search": True}, "'body.use_beam_search': is not supported"),
                       ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
                        "'body.messages[0].content[0].type'"),
                       ({"stop_token_ids": [3000000000]}, "'body.stop_token_ids'"),
                       ({"priority": "high"}, "'body.priority'"),
                       ({"logit_bias": {"1": 2}}, "unknown field 'body.logit_bias'")):
        bad = {**chat, "body": {**chat["body"], **body}}
        item = parse_line(2, json.dumps(bad), {})
        assert item.error is not None and what in item.error, (body, item.error)
        assert item.fmt == "openai" and item.id == "c"
    # A plain line takes content parts too.
    item = parse_line(3, json.dumps({"id": 1, "messages": chat["body"]["messages"]}), {})
    assert item.error is None and item.messages[1]["content"] == "a\nb"


# -- files: encodings, huge lines, invalid bytes -------------------------------------------------
def test_input_encodings(tmp_path):
    good = '{"id": 1, "prompt_token_ids": [1, 2]}\n'
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + good.encode() + good.encode())
    items = read_batch(str(p))
    assert [it.error for it in items] == [None, None]   # the BOM does not cost line 1
    for enc, what in (("utf-16", "UTF-16 (little-endian)"), ("utf-16-be", "NUL bytes"),
                      ("utf-32", "UTF-32")):
        p = tmp_path / f"{enc}.jsonl"
        p.write_bytes(good.encode(enc) * 3)
        with pytest.raises(InputError, match="UTF-8") as e:
            read_batch(str(p))
        assert what in str(e.value), str(e.value)
    p = tmp_path / "bytes.jsonl"
    p.write_bytes(good.encode() + b'{"id": "x", "prompt": "caf\xe9"}\n' + good.encode())
    items = read_batch(str(p))
    assert items[0].error is None and items[2].error is None
    assert items[1].id == "x" and "line 2: invalid UTF-8 (byte 0xe9" in items[1].error
    assert "--errors=replace" in items[1].error
    items = read_batch(str(p), errors="replace")
    assert items[1].error is None and items[1].prompt == "caf\ufffd"
    p = tmp_path / "long.jsonl"
    long_line = b'{"id": "big", "prompt": "' + b"x" * 5000 + b'"}\n'
    p.write_bytes(good.encode() + long_line + good.encode())
    items = read_batch(str(p), max_line_bytes=1000)
    assert [it.error is None for it in items] == [True, False, True]
    assert (f"line 2: the line has {len(long_line)} bytes, more than --max_line_bytes=1000"
            in items[1].error)
    p.write_bytes(good.encode() + b'{"id": 1, "prompt": "a\x00b"}\n')
    assert "line 2: malformed JSON" in read_batch(str(p))[1].error


# -- the resume log -------------------------------------------------------------------------------
JOB = {"input": "/x/in.jsonl", "model": "/x/model"}


def _expected(n, model="m", req=lambda i: f"r{i}"):
    return {f"{i}:q{i}": (Hashes(req(i), model, "e"), lambda rec: None if rec.get("ok") else "bad")
            for i in range(1, n + 1)}


def _fill(tmp_path, n=30):
    out = str(tmp_path / "o.jsonl")
    log = ResultsLog(out, JOB)
    exp = _expected(n)
    done, rep = log.start(exp)
    assert done == {} and not rep.found
    for k, (h, _) in exp.items():
        log.append(k, h, {"ok": True, "text": f"t{k}"})
    log.close()
    return out, exp


def test_resume_log_keeps_every_good_record_around_bad_ones(tmp_path):
    out, exp = _fill(tmp_path)
    lines = open(out + ".partial", "rb").read().splitlines(keepends=True)
    assert len(lines) == 31   # header + 30
    forged = json.dumps({"k": "3:q3", "h": {"r": "r3", "m": "m", "e": "e"},
                         "rec": {"ok": True, "text": "INJECTED"}, "sum": "0" * 32}).encode() + b"\n"
    edited = lines[5].replace(b'"t5:q5"', b'"EDITED"')
    lines[10] = b"garbage line {{{\n"            # record 10
    lines[5] = edited                           # record 5
    lines.insert(12, b'{"_key": "1:q00"}\n')     # the old format's key-only record
    lines.insert(13, forged)
    lines.append(b'{"k": "31:q31", "h": {"r": "x"')   # torn last line
    open(out + ".partial", "wb").write(b"".join(lines))
    log = ResultsLog(out, JOB)
    done, rep = log.start(exp)
    assert len(done) == 28 and "10:q10" not in done and "5:q5" not in done
    assert all(r["text"] == f"t{k}" for k, r in done.items())   # nothing forged or edited
    assert rep.dropped == {"unreadable line": 1, "checksum mismatch (edited or corrupt)": 2,
                           "not a result record": 1} and rep.torn and rep.reused == 28
    msg = "\n".join(rep.lines(log.path, 30))
    assert "28 of 30 results reused" in msg and "dropped 4 records" in msg and "torn" in msg
    # The log was rewritten cleanly: appends after it read back as well-formed records.
    log.append("10:q10", exp["10:q10"][0], {"ok": True, "text": "t10:q10"})
    log.close()
    done2, rep2 = ResultsLog(out, JOB).start(exp)
    assert len(done2) == 29 and not rep2.dropped and not rep2.torn


def test_resume_log_recomputes_changed_records_and_says_why(tmp_path):
    out, _ = _fill(tmp_path, 6)
    exp = _expected(6, req=lambda i: "changed" if i in (2, 5) else f"r{i}")
    done, rep = ResultsLog(out, JOB).start(exp)
    assert sorted(done) == ["1:q1", "3:q3", "4:q4", "6:q6"] and rep.recomputed == {"request changed": 2}
    (tmp_path / "b").mkdir()
    out, _ = _fill(tmp_path / "b", 6)
    done, rep = ResultsLog(out, JOB).start(_expected(6, model="other weights"))
    assert done == {} and rep.recomputed == {"model changed": 6}
    # A record that fails its line's schema check is dropped, not copied through.
    exp = _expected(6)
    exp["2:q2"] = (exp["2:q2"][0], lambda rec: "id does not match the line")
    (tmp_path / "c").mkdir()
    out, _ = _fill(tmp_path / "c", 6)
    done, rep = ResultsLog(out, JOB).start(exp)
    assert "2:q2" not in done and rep.dropped == {"does not fit its input line (id does not match the line)": 1}


def test_foreign_or_headerless_partial_is_refused_unless_overwrite(tmp_path):
    out, exp = _fill(tmp_path, 3)
    for job in ({**JOB, "input": "/x/other.jsonl"}, {**JOB, "model": "/x/other-model"}):
        with pytest.raises(PartialRefused, match="another job.*--overwrite"):
            ResultsLog(out, job).start(exp)
    done, rep = ResultsLog(out, {**JOB, "model": "/x/other-model"}).start(exp, overwrite=True)
    assert done == {} and rep.discarded and not rep.found
    # The previous format (no header, `_key` in each record) cannot be checked: refused too.
    open(out + ".partial", "w").write('{"_key": "1:q1", "text": "old"}\n{"_key": "2:q2"}\n')
    with pytest.raises(PartialRefused, match="no valid header.*--overwrite"):
        ResultsLog(out, JOB).start(exp)
    # A header with no records (a job that stopped before its first result) is simply replaced.
    log = ResultsLog(out, {**JOB, "input": "/x/other.jsonl"})
    log.start(exp, overwrite=True)
    log.close()
    assert ResultsLog(out, JOB).start(exp)[0] == {}


def test_failed_write_keeps_whole_records(tmp_path, monkeypatch):
    out = str(tmp_path / "o.jsonl")
    log = ResultsLog(out, JOB)
    exp = _expected(10)
    log.start(exp)
    real_write = os.write
    calls = {"n": 0}

    def write(fd, data):
        calls["n"] += 1
        if calls["n"] > 4:   # the 5th record: half of it reaches the disk, then ENOSPC
            real_write(fd, bytes(data[:len(data) // 2]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    with pytest.raises(ResultsLogWriteError, match="No space left on device.*the 4 results"):
        for k, (h, _) in exp.items():
            log.append(k, h, {"ok": True, "text": k})
    monkeypatch.setattr(os, "write", real_write)
    log.close()
    done, rep = ResultsLog(out, JOB).start(exp)
    assert sorted(done) == sorted(list(exp)[:4]) and not rep.dropped and not rep.torn


# -- the lock -----------------------------------------------------------------------------------
def test_output_lock_one_job_per_output(tmp_path):
    out = str(tmp_path / "o.jsonl")
    a = OutputLock(out)
    assert a.acquire("/x/a.jsonl") is None
    with pytest.raises(OutputLocked, match=r"o\.jsonl\.lock: another job .*pid %d" % os.getpid()):
        OutputLock(out).acquire("/x/b.jsonl")
    a.release()
    assert not os.path.exists(out + ".lock")
    b = OutputLock(out)
    assert b.acquire("/x/b.jsonl") is None
    b.release()


def test_stale_lock_of_a_killed_job_is_taken_over(tmp_path):
    out = str(tmp_path / "o.jsonl")
    # A child takes the lock and is killed with SIGKILL: its file stays, its flock goes.
    code = ("import sys, time; sys.path.insert(0, %r); from jaxserve.io.lock import OutputLock; "
            "OutputLock(%r).acquire('/x/dead.jsonl'); print('locked', flush=True); time.sleep(60)"
            % (ROOT, out))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    with pytest.raises(OutputLocked, match=f"pid {child.pid}"):
        OutputLock(out).acquire("/x/me.jsonl")
    child.kill()
    child.wait()
    assert os.path.exists(out + ".lock")
    lock = OutputLock(out)
    stale = lock.acquire("/x/me.jsonl")
    assert stale["pid"] == child.pid and stale["input"] == "/x/dead.jsonl"
    assert json.load(open(out + ".lock"))["pid"] == os.getpid()
    lock.release()


# -- paths and permissions ------------------------------------------------------------------------
def test_output_path_checks(tmp_path):
    assert check_output_path(str(tmp_path / "new" / "deeper" / "o.jsonl"))   # created
    assert (tmp_path / "new" / "deeper").is_dir()
    assert not check_output_path(str(tmp_path / "new" / "deeper" / "o.jsonl"))
    with pytest.raises(OutputPathError, match="is a directory"):
        check_output_path(str(tmp_path / "new"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputPathError, match="cannot create the output folder"):
        check_output_path(str(tmp_path / "afile" / "o.jsonl"))
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        # An existing folder this process may not write in. Root writes in any folder whatever
        # its mode (and os.access says yes), but not in sysfs.
        folder = str(ro) if not os.access(ro, os.W_OK) else "/sys/kernel"
        if not os.path.isdir(folder):
            pytest.skip("no folder this process may not write in")
        with pytest.raises(OutputPathError, match=f"cannot write in the output folder {folder}"):
            check_output_path(os.path.join(folder, "o.jsonl"))
    finally:
        ro.chmod(0o700)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_outputs_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        out = str(tmp_path / "o.jsonl")
        write_jsonl_atomic(out, [{"a": 1}])
        log = ResultsLog(out + "2", JOB)
        log.start({})
        log.close()
    finally:
        os.umask(old)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask
    assert os.stat(out + "2.partial").st_mode & 0o777 == 0o666 & ~umask


def test_check_record_schema():
    item = parse_line(1, '{"id": "a", "prompt_token_ids": [1]}', {})
    good = {"id": "a", "text": "x", "token_ids": [1], "finish_reason": "stop", "error": None}
    assert check_record(item, good) is None
    assert check_record(item, {}) is not None
    assert check_record(item, {**good, "id": "b"}) == "id does not match the line"
    assert check_record(item, {**good, "finish_reason": "exploded"}) is not None


# -- models and versions ----------------------------------------------------------------------
def test_content_key_model_identity(tiny_models, tmp_path):
    from jaxserve.io.content_key import model_identity

    path, _ = tiny_models["llama3"]
    a = model_identity(path)
    assert a == model_identity(path) and a.source == os.path.realpath(path)
    # Files that are not the model's (an output written into its folder) do not change it.
    open(os.path.join(path, "results.jsonl.partial"), "w").close()
    try:
        assert model_identity(path) == a
    finally:
        os.unlink(os.path.join(path, "results.jsonl.partial"))
    shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
    st = os.stat(os.path.join(path, shard))
    os.utime(os.path.join(path, shard), ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    try:
        b = model_identity(path)
        assert b.source == a.source and b.content != a.content   # re-saved weights
    finally:
        os.utime(os.path.join(path, shard), ns=(st.st_atime_ns, st.st_mtime_ns))
    d = model_identity("tiny-llama", "dummy", 0)
    assert d.source == "tiny-llama" and d != model_identity("tiny-llama", "dummy", 1)


def test_unsupported_architectures_are_named():
    from jaxserve.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
    from jaxserve.models import REGISTRY

    assert set(SUPPORTED_ARCHITECTURES) == set(REGISTRY)
    for cfg, what in (({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 768},
                       "architecture 'GPT2LMHeadModel' is not supported"),
                      ({"architectures": ["MambaForCausalLM"], "model_type": "mamba"},
                       "architecture 'MambaForCausalLM' is not supported"),
                      ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
                      ({"hidden_size": 8}, "neither 'architectures' nor 'model_type'")):
        with pytest.raises(ConfigError, match=what):
            ModelConfig.from_hf_dict(cfg, source="c.json")


def test_index_paths_must_stay_inside_the_model_folder(tiny_models, tmp_path):
    import shutil

    from jaxserve.weights import WeightError
    from jaxserve.weights.safetensors_loader import SafetensorsCheckpoint

    path, _ = tiny_models["llama3"]
    model = tmp_path / "model"
    shutil.copytree(path, model)
    (tmp_path / "secret").mkdir()
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    shard = index["weight_map"][first]
    shutil.copy(model / shard, tmp_path / "secret" / "model.safetensors")
    SafetensorsCheckpoint(str(model))   # as saved: fine
    for bad in ("../secret/model.safetensors", str(tmp_path / "secret" / "model.safetensors"),
                "sub/../../secret/model.safetensors"):
        wm = {k: (bad if v == shard else v) for k, v in index["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
        with pytest.raises(WeightError, match="outside the model folder|not a path inside"):
            SafetensorsCheckpoint(str(model))
    # A symlinked subfolder that leads out is refused too.
    os.symlink(tmp_path / "secret", model / "link")
    wm = {k: ("link/model.safetensors" if v == shard else v) for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    with pytest.raises(WeightError, match="outside the model folder"):
        SafetensorsCheckpoint(str(model))


def test_untested_jax_version_warns_naming_the_range():
    from jaxserve import _jax_version_warning

    for ok in ("0.10.2", "0.11.2", "0.11.0", "0.10.3.dev20250101"):
        assert _jax_version_warning(ok) is None, ok
    for bad in ("0.10.1", "0.12.0", "0.12.0rc1", "1.0"):
        msg = _jax_version_warning(bad)
        assert msg and "jax>=0.10.2,<0.12" in msg and bad in msg
    # At import, without importing jax: a fresh interpreter with a faked jax version.
    code = ("import importlib.metadata as m, warnings, sys; real = m.version; "
            "m.version = lambda p: '0.13.1' if p == 'jax' else real(p); "
            "warnings.simplefilter('always'); "
            "import jaxserve; print('jax' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "jax>=0.10.2,<0.12" in res.stderr and "0.13.1" in res.stderr
    assert res.stdout.strip() == "False"   # the check did not import jax
    assert res.stderr.count("is tested with") == 1


def test_pyproject_declares_the_tested_jax_range():
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    assert '"jax>=0.10.2,<0.12"' in text
    assert '"jax[cuda12]>=0.10.2,<0.12"' in text and '"jax[cuda13]>=0.10.2,<0.12"' in text
