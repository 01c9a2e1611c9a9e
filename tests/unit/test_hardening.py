"""Issue 26 (hardening): sizes that would crash or write out of bounds, thread counts, numbers
that reach C, and bad input that gave tracebacks or silently wrong answers. Each refusal is the
one-line :class:`UserError`; what is accepted gives the reference numbers.
"""

from __future__ import annotations

import copy
import ctypes
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_native import CFG, CFG32, _reference_logits, _tiny, _write

from cscompile.bundle import BundleError
from cscompile.cli.main import EXIT_USER, main
from cscompile.errors import UserError
from cscompile.limits import INT32_MAX, MAX_THREADS, check_threads, max_threads
from cscompile.native import engine as native

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

#: integers around the widths that wrap: int32, uint32, int64
WRAPS = st.builds(
    lambda base, delta: base + delta,
    st.sampled_from([2**31, 2**32, 2**63, 2**64, -(2**31), -(2**63)]),
    st.integers(-64, 64),
)
#: and small and negative ones
NEAR_WRAP = st.one_of(WRAPS, st.integers(-3, 3))


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg and " | " in msg and "Expected" in msg, msg
    return msg


# -- item 1/3: a native engine's config, fuzzed --------------------------------------------------
@pytest.fixture(scope="module")
def engines(tmp_path_factory):  # type: ignore[no-untyped-def]
    """Two native engines on disk (whole, and narrowed with a width), their metas and reference logits."""
    out = {}
    for name, c, narrow in (("whole", CFG, False), ("narrow", CFG32, True)):
        w, dense = _tiny(seed=21, c=c)
        if narrow:
            w = native.derive(
                w, [native.LayerPlan(heads=(0, 3), ffn_blocks=(1,)), native.LayerPlan(ffn_blocks=(0,))]
            )
        root = tmp_path_factory.mktemp(name)
        meta = _write(root, native.engine_files(w))
        ids = np.arange(11) * 7 % c["vocab"]
        ref = native.NativeDecoder(w, threads=1, max_ctx=16).logits_all(ids)
        out[name] = (root, meta, ids, ref)
    return out


def _paths(meta: dict) -> list[tuple[str, ...]]:  # type: ignore[type-arg]
    """Every integer of the config (the width's included) and of the matrix specs."""
    paths = [("config", k) for k in native._CONFIG_INTS]
    wd = meta["config"].get("width")
    if wd:
        paths += [("config", "width", "ffn", i) for i in range(len(wd["ffn"]))]
        paths += [
            ("config", "width", "heads", i, j) for i, hs in enumerate(wd["heads"]) for j in range(len(hs))
        ]
    paths += [("matrices", m, f) for m in meta["matrices"] for f in ("n", "k", "bits")]
    return paths  # type: ignore[return-value]


@FUZZ
@given(data=st.data())
def test_fuzzed_native_config_integers_are_refused_or_run_exactly(engines, data):
    """An integer of engine.json set near 2^31, 2^32 or 2^63: load_weights refuses it in one line
    (before anything is sized from it), or the model loads and runs to the reference logits."""
    name = data.draw(st.sampled_from(sorted(engines)))
    root, meta, ids, ref = engines[name]
    bad = copy.deepcopy(meta)
    path = data.draw(st.sampled_from(_paths(meta)))
    # (a kept head's index in range is another valid width: the matrices cannot tell which heads)
    value = data.draw(WRAPS if path[1:3] == ("width", "heads") else NEAR_WRAP)
    obj = bad
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value
    try:
        w = native.load_weights(root, bad, "fuzz")
    except BundleError as exc:
        assert "native/engine.json" in _one_line(exc)
        return
    got = native.NativeDecoder(w, threads=1, max_ctx=16).logits_all(ids)
    np.testing.assert_array_equal(got, ref)


def test_inter_that_wraps_in_c_is_refused(engines):
    """The reported case: inter = 2^32 + 32 with a width passed validate and the C side sized its
    scratch for 32 channels (a heap overflow in qgemv)."""
    root, meta, _, _ = engines["narrow"]
    bad = copy.deepcopy(meta)
    bad["config"]["inter"] = 2**32 + 32
    with pytest.raises(BundleError, match=r"integers in \[1, 2147483647\]"):
        native.load_weights(root, bad, "test")
    w = native.load_weights(root, meta, "test")
    w.config["inter"] = 2**32 + 32
    with pytest.raises(UserError, match="2147483647"):
        native.NativeDecoder(w, threads=1)


@pytest.mark.parametrize(
    "change,match",
    [
        ({"n_layers": 2**40}, "integers in"),
        ({"n_layers": 10**7}, "weights file"),  # fits int32, but not the file
        ({"vocab": 10**9}, "weights file"),
        ({"n_heads": 3_000_000, "n_kv": 1}, "attention width"),  # with a width: no matrix shows it
        ({"inter": 2**31 - 32}, "below 2\\^31"),
        ({"inter": 2**29}, "hidden"),
    ],
)
def test_configs_are_checked_before_any_allocation(engines, change, match):
    root, meta, _, _ = engines["narrow"]
    bad = copy.deepcopy(meta)
    bad["config"].update(change)
    with pytest.raises(BundleError, match=match) as info:
        native.load_weights(root, bad, "test")
    _one_line(info.value)


# -- the C step checks every size itself -----------------------------------------------------------
_MODEL_INTS = [f for f, _ in native._Model._fields_ if f in native._INTS]
_QMAT_INTS = ("n", "k", "bits")


@FUZZ
@given(data=st.data())
def test_the_c_step_refuses_sizes_python_did_not_check(data):
    """Fields of the C struct changed behind Python's checks (ctypes wraps to int32): the C step
    refuses, or its answer is the reference; it never reads or writes out of bounds."""
    w, _ = _tiny(seed=5)
    ids = np.arange(9) * 5 % CFG["vocab"]
    dec = native.NativeDecoder(w, threads=1, max_ctx=16)
    ref = dec.logits_all(ids).copy()
    int32 = st.one_of(
        st.integers(-(2**31), 2**31 - 1),
        st.integers(-2, 300),
        NEAR_WRAP.map(lambda v: ((v & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000),
    )
    st_model = dec._structs[0]
    where = data.draw(st.sampled_from(["model", "qkv", "o", "gu", "down", "head", "lens", "width"]))
    other_model = False  # a change that describes another valid model (other numbers)
    if where == "model":
        field = data.draw(st.sampled_from(_MODEL_INTS))
        value = data.draw(int32)
        setattr(st_model.model, field, value)
        other_model = field == "n_layers" and value == 1  # the first layer alone
    elif where == "lens":  # a buffer said to be shorter than it is (never longer: C cannot see that lie)
        field = data.draw(st.sampled_from(native._LENS))
        full = getattr(st_model.model, field)
        setattr(st_model.model, field, data.draw(st.integers(-1, max(full, 0))))
    elif where == "width":  # per-layer widths on a whole model's struct
        hs, kv, fi = st_model.width
        st_model.model.layer_heads, st_model.model.head_kv, st_model.model.layer_inter = (
            hs.ctypes.data, kv.ctypes.data, fi.ctypes.data)  # fmt: skip
        which = data.draw(st.sampled_from([0, 1, 2]))
        arr = (hs, kv, fi)[which]
        # a KV head in range, or an FFN dropped (0), is another valid model (other numbers): not here
        valid = (lambda v: False, lambda v: 0 <= v < CFG["n_kv"], lambda v: v == 0)[which]
        value = data.draw(int32.filter(lambda v: not valid(v)))
        arr.reshape(-1)[data.draw(st.integers(0, arr.size - 1))] = value
    else:
        mats = [st_model.head] if where == "head" else list(st_model.mats[where])
        m = data.draw(st.sampled_from(mats))
        field = data.draw(st.sampled_from([*_QMAT_INTS, "codes_len", "d_len", "m_len"]))
        value = data.draw(int32)
        if field.endswith("_len"):
            value = min(value, getattr(m, field))
        setattr(m, field, value)
    try:
        got = dec.logits_all(ids)
    except UserError as exc:
        assert "C step refused" in _one_line(exc) or "token id" in str(exc) or "context" in str(exc)
        return
    if not other_model:
        np.testing.assert_array_equal(got, ref)


def test_kernels_refuse_short_buffers_and_thread_counts():
    lib = native.library()
    from test_native import _grid

    p = native.pack(_grid(np.random.default_rng(0), "Q4_1", 32, 64))
    s = p.struct()
    x, y, work = np.zeros(64, np.float32), np.zeros(32, np.float32), np.zeros(256, np.float32)

    def gemv(xl=64, yl=32, wl=256, threads=1):  # type: ignore[no-untyped-def]
        return lib.cs_dec_gemv(ctypes.addressof(s), x.ctypes.data, xl, y.ctypes.data, yl, threads,
                               work.ctypes.data, wl)  # fmt: skip

    assert gemv() == 0
    assert gemv(xl=63) == gemv(yl=31) == gemv(wl=8) == -4
    assert gemv(threads=0) == gemv(threads=MAX_THREADS + 1) == -3
    s.codes_len -= 1
    assert gemv() == -5
    with pytest.raises(UserError, match="threads"):
        native.gemv(p, x, threads=2**32 + 1)
    with pytest.raises(UserError, match="threads"):
        native.gemm(p, x[None], threads=-1)


# -- item 2: thread counts ----------------------------------------------------------------------
@pytest.mark.parametrize("threads", [0, -1, 2**32 + 1, 100_000, 32_768, MAX_THREADS + 1, True, 2.0, "2"])
def test_thread_counts_out_of_bounds_are_refused(threads):
    with pytest.raises(UserError, match=r"Expected an integer in \[1, ") as info:
        check_threads(threads)
    _one_line(info.value)
    w, _ = _tiny()
    with pytest.raises(UserError, match="threads"):
        native.NativeDecoder(w, threads=threads)
    with pytest.raises(UserError, match="threads"):
        native.NativeSession(w, threads=threads)


def test_thread_bound_and_every_engine_takes_it(monkeypatch):
    from cscompile.decode.session import default_threads, make_session_options
    from cscompile.runtime import load

    assert 1 <= max_threads() <= MAX_THREADS and check_threads(max_threads()) == max_threads()
    with pytest.raises(UserError, match="threads"):
        make_session_options(100_000)  # the dense engine (ORT) hung on it
    with pytest.raises(UserError, match="threads"):
        load("/nonexistent.csb", threads=-1)  # before the bundle is even opened
    monkeypatch.setenv("CSCOMPILE_THREADS", "100000")
    with pytest.raises(UserError, match="CSCOMPILE_THREADS"):
        default_threads()
    monkeypatch.setenv("CSCOMPILE_THREADS", "1")
    assert default_threads() == 1


# -- item 6: the CLI's numbers, one line each ----------------------------------------------------
@pytest.mark.parametrize(
    "flag,value,subject",
    [
        ("--temperature", "-1", "--temperature"),
        ("--temperature", "nan", "--temperature"),
        ("--temperature", "inf", "--temperature"),
        ("--top-p", "2", "--top-p"),
        ("--top-p", "0", "--top-p"),
        ("--threads", "0", "--threads"),
        ("--threads", "100000", "--threads"),
        ("--threads", str(2**32 + 1), "--threads"),
        ("--seed", "-1", "--seed"),
        ("--stop", "", "stop"),
        ("-n", "-3", "--max-new-tokens"),
    ],
)
def test_bad_numbers_are_one_line_errors(capsys, flag, value, subject):
    code = main(["run", "no-such-model", "hi", flag, value])
    err = capsys.readouterr().err
    assert code == EXIT_USER, err
    assert err.startswith(f"error: {subject} | ") and "Expected" in err, err
    assert len(err.strip().splitlines()) == 1 and "Usage" not in err


def test_tiny_temperatures_sample_the_argmax():
    from cscompile.runtime import GenerationConfig, sample

    logits = np.array([0.5, 2.0, -1.0, 1.9], np.float32)
    for t in (1e-310, 5e-324, 1e-30):
        cfg = GenerationConfig(temperature=t, seed=0)
        cfg.validate()
        assert sample(logits, cfg, np.random.default_rng(0)) == 1
    for bad in (
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"top_p": math.nan},
        {"seed": -1},
        {"stop": ("",)},
        {"stop": "x"},
        {"max_new_tokens": 2.5},
    ):
        with pytest.raises(UserError):
            GenerationConfig(**bad).validate()  # type: ignore[arg-type]


def test_hash_mismatch_shows_where_the_digits_differ():
    from cscompile.bundle.loader import _hash_error

    a, b = "0123456789abcdef" + "0" * 48, "0123456789abcdef" + "1" * 48
    msg = str(_hash_error("bundle x: f", a, b))
    got, listed = msg.split(" | has sha256 ")[1].split(" but the manifest lists ")
    assert got.rstrip("…") != listed.split(".")[0].rstrip("…") and got.startswith(a[:17])


def test_inspect_of_external_data_outside_the_folder_is_one_line(tmp_path, capsys):
    from test_bundle import add_model

    for location, what in (
        ("../outside.bin", "not a file in the model's folder"),
        ("w.bin", "within its file"),
    ):
        d = tmp_path / location.replace("/", "_").replace(".", "_")
        d.mkdir()
        (tmp_path / "outside.bin").write_bytes(b"\0" * 8)
        (d / "w.bin").write_bytes(b"\0" * 4)  # 4 bytes: the tensor reads 8
        (d / "model.onnx").write_bytes(add_model(external=location))
        code = main(["inspect", str(d / "model.onnx")])
        err = capsys.readouterr().err
        assert code == EXIT_USER and what in err and len(err.strip().splitlines()) == 1, err


def test_context_lengths_are_bounded(tmp_path):
    from cscompile.model_config import read_context_length
    from cscompile.passes.fuse import MAX_ROPE_POSITIONS, FuseAttentionPass

    for value in (1e12, 2**40, -1, "2048", True):
        (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": value}))
        with pytest.raises(UserError, match="max_position_embeddings"):
            read_context_length(tmp_path)
    with pytest.raises(UserError, match=str(MAX_ROPE_POSITIONS)):
        FuseAttentionPass(max_positions=INT32_MAX)  # 7 TiB of RoPE tables were attempted


def test_tokenizer_config_fields_are_typed(tiny_dir, tmp_path):
    import shutil

    from cscompile.decode.tokenizer import Tokenizer

    src = tiny_dir("llama-2l") / "tokenizer"
    for name, content in (
        ("bytes", b'{"eos_token": "\xff\xfe"}'),
        ("list", b"[1, 2]"),
        ("eos", json.dumps({"eos_token": {"content": 5}}).encode()),
        ("bos", json.dumps({"bos_token": ["<s>"]}).encode()),
        ("template", json.dumps({"chat_template": 3}).encode()),
    ):
        d = tmp_path / name
        shutil.copytree(src, d)
        (d / "tokenizer_config.json").write_bytes(content)
        with pytest.raises(UserError) as info:
            Tokenizer(d)
        _one_line(info.value)


# -- item 7: the API refuses what it would otherwise misread -------------------------------------
def test_prompts_the_engines_would_misread_are_refused(tiny_model):
    from cscompile.runtime import GenerationConfig

    cfg = GenerationConfig(max_new_tokens=2)
    vocab = tiny_model.vocab_size
    for prompt, match in (
        (b"\xff\xfe", "a bytes"),
        ([1, vocab], f"token id {vocab}"),
        ([1, -1], "token id -1"),
        ([1, True], "True"),
        ([1.0], "1.0"),
        ("a\ud800b", "lone surrogate U\\+D800"),
    ):
        with pytest.raises(UserError, match=match) as info:
            tiny_model.generate(prompt, cfg)  # type: ignore[arg-type]
        _one_line(info.value)
    # the dense session itself refuses too (ORT's Gather read zeros, or wrapped -1 to the last row)
    state = tiny_model.session.new_state()
    with pytest.raises(UserError, match="token id"):
        tiny_model.session.forward(np.array([[vocab]], np.int64), state)
    ok = tiny_model.generate([1, 2, vocab - 1], cfg)
    assert len(ok.token_ids) <= 2


def test_native_and_dense_refuse_the_same_ids():
    from cscompile.decode.generate import TextModel

    w, dense = _tiny(seed=2)
    sess = native.NativeSession(w, threads=1, context_length=32)

    class _Tok:
        vocab_size = 10**6  # larger than the model's: the engine's vocabulary decides
        eos_token_ids: set[int] = set()

    tm = TextModel(sess, _Tok(), context_length=32)  # type: ignore[arg-type]
    assert tm.vocab_size == CFG["vocab"]
    for bad in ([CFG["vocab"]], [-1]):
        with pytest.raises(UserError, match="token id"):
            tm.encode_prompt(bad)
    ids = [3, 1, 4, 1, 5]
    np.testing.assert_allclose(
        sess.forward(np.array([ids]), sess.new_state())[0],
        _reference_logits(dense, np.array(ids)),
        rtol=0,
        atol=2e-3 * np.abs(_reference_logits(dense, np.array(ids))).max(),
    )
