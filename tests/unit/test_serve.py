"""``cscompile serve``: the OpenAI-compatible server on a tiny bundle, driven by the real ``openai`` client.

Every answer is compared with ``model.generate`` run alone on the same bundle. The server runs in
uvicorn on a free 127.0.0.1 port in a thread, as it does in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from cscompile.compiler.build import build_bundle  # noqa: E402
from cscompile.runtime import GenerationConfig, TokenEvent, load  # noqa: E402
from cscompile.serve import create_app  # noqa: E402

PROMPTS = ["The quick brown fox", "def f(x):", "Once upon a time", "import os"]


@pytest.fixture(scope="module")
def bundle_path(tiny_dir, tmp_path_factory):
    return build_bundle(
        tiny_dir("llama-2l"), tmp_path_factory.mktemp("serve") / "tiny.csb", precision="fp32"
    ).path


@pytest.fixture(scope="module")
def model(bundle_path):
    with load(bundle_path, threads=1) as m:
        yield m


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free port in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(url: str, prompt: str, chat: bool, args: dict[str, Any]) -> str:
    """One request through the ``openai`` client (``args["stream"]`` streamed or whole): its text."""
    c = client(url)
    if chat:
        r = c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **args)
        if args.get("stream"):
            return "".join(ch.choices[0].delta.content or "" for ch in r)
        return r.choices[0].message.content  # type: ignore[no-any-return]
    r = c.completions.create(prompt=prompt, **args)
    return "".join(ch.choices[0].text for ch in r) if args.get("stream") else r.choices[0].text


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def wait_until(cond: Any, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(model, model_name="tiny", max_running=4, max_queue=8)
    with serving(app) as url:
        yield url, app


def solo(model: Any, prompt: str, chat: bool, **kw: Any) -> Any:
    return model.generate(prompt, GenerationConfig(**kw), chat=chat)


def test_models_health_and_page(server):
    url, _ = server
    models = client(url).models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].model_extra["context_length"] == 256
    assert "one sequence per step" in models[0].model_extra["scheduling"]  # ORT: no batched step
    assert models[0].model_extra["batched_decode"] is False
    status, _, body = get(f"{url}/health")
    assert status == 200 and json.loads(body) == {"status": "ok", "model": "tiny", "batched_decode": False}
    status, headers, body = get(f"{url}/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"/v1/chat/completions" in body and b"<script>" in body


NODE_DRIVER = """
const BASE = process.argv[1], els = {};
const defaults = {max_tokens: "8", temperature: "0", top_p: "1", system: ""};
const node = (id) => ({id, value: defaults[id] ?? "", textContent: "", className: "", children: [],
  appendChild(c) { this.children.push(c); }, addEventListener() {}, scrollIntoView() {}, requestSubmit() {}});
globalThis.document = {getElementById: (id) => (els[id] ??= node(id)), createElement: () => node("")};
const realFetch = fetch;
globalThis.fetch = (url, opts) => realFetch(BASE + url, opts);
"""


def test_chat_page_script_talks_to_the_server(server, model):
    """The page's own JavaScript (run by Node with a stub DOM) streams a chat answer equal to generate's."""
    import re
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    url, _ = server
    html = get(f"{url}/")[2].decode()
    script = re.search(r"<script>(.*)</script>", html, re.S).group(1)
    driver = (
        NODE_DRIVER
        + script
        + (
            "\n(async () => { await loadModel(); await send('The quick brown fox');"
            " console.log(JSON.stringify({model, history, status: $('status').textContent})); })();"
        )
    )
    out = subprocess.run([node, "-e", driver, url], capture_output=True, text=True, timeout=60, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ref = solo(model, "The quick brown fox", True, max_new_tokens=8)
    assert got["model"] == "tiny"
    assert got["history"] == [{"role": "user", "content": "The quick brown fox"},
                              {"role": "assistant", "content": ref.text}]  # fmt: skip
    assert f"+ {len(ref.token_ids)} new tokens" in got["status"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_greedy_equals_generate(server, model, chat):
    url, _ = server
    c = client(url)
    ref = solo(model, PROMPTS[0], chat, max_new_tokens=12)
    assert ref.token_ids and ref.text  # the comparison below is not vacuous
    n_prompt = len(model.text_model.encode_prompt(PROMPTS[0], chat=chat))
    if chat:
        r = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPTS[0]}],
                                      max_tokens=12, temperature=0)  # fmt: skip
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
        assert r.choices[0].message.role == "assistant" and r.object == "chat.completion"
    else:
        r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0)
        text, reason = r.choices[0].text, r.choices[0].finish_reason
    assert text == ref.text
    assert reason == ("length" if ref.stats.stop_reason == "length" else "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(ref.token_ids))
    assert r.usage.total_tokens == n_prompt + len(ref.token_ids)

    # the same request streamed: the pieces join to the same text; usage in the last chunk
    kw: dict[str, Any] = dict(model="tiny", max_tokens=12, temperature=0, stream=True,
                              stream_options={"include_usage": True})  # fmt: skip
    if chat:
        chunks = list(c.chat.completions.create(messages=[{"role": "user", "content": PROMPTS[0]}], **kw))
        pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        chunks = list(c.completions.create(prompt=PROMPTS[0], **kw))
        pieces = [ch.choices[0].text for ch in chunks if ch.choices]
    assert len(pieces) > 2 and "".join(pieces) == ref.text
    reasons = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert reasons[-1] == reason and not any(reasons[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)


def test_sampling_parameters_reach_the_runtime(server, model):
    """temperature, top_p, seed and stop: the server's answer equals generate with the same settings."""
    url, _ = server
    c = client(url)
    cfg = dict(max_new_tokens=16, temperature=0.9, top_p=0.9, seed=7)
    ref = solo(model, PROMPTS[2], False, **cfg)
    other = solo(model, PROMPTS[2], False, **{**cfg, "seed": 8})
    assert ref.text != other.text  # the seed matters
    r = c.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.9, seed=7
    )
    assert r.choices[0].text == ref.text
    stop = ref.text[len(ref.text) // 2 : len(ref.text) // 2 + 2]
    assert stop.strip()
    ref_stop = solo(model, PROMPTS[2], False, **cfg, stop=(stop,))
    r = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=0.9, top_p=0.9,
                             seed=7, stop=[stop])  # fmt: skip
    assert r.choices[0].text == ref_stop.text and stop not in r.choices[0].text
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("kw", "param", "status"),
    [
        ({"temperature": 5}, "temperature", 400),
        ({"top_p": 0}, "top_p", 400),
        ({"max_tokens": 0}, "max_tokens", 400),
        ({"seed": -1}, "seed", 400),
        ({"n": 2}, "n", 400),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", 400),
        ({"extra_body": {"mirostat": 2}}, "mirostat", 400),
        ({"model": "gpt-4"}, "model", 404),
    ],
)
def test_bad_parameters_are_refused_in_openai_shape(server, kw, param, status):
    url, _ = server
    args = {"model": "tiny", "prompt": "hi", "max_tokens": 4, **kw}
    with pytest.raises(openai.APIStatusError) as err:
        client(url).completions.create(**args)
    assert err.value.status_code == status
    body = err.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["param"] == param
    assert param in body["message"] or status == 404


def test_raw_error_shape_and_bad_json(server):
    url, _ = server
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=30)
    assert err.value.code == 400
    assert set(json.loads(err.value.read())["error"]) == {"message", "type", "param", "code"}


def test_over_the_context_is_400(server, model):
    url, _ = server
    c = client(url)
    long_prompt = list(range(10, 10 + 250))  # token ids; the tiny context is 256
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt=long_prompt, max_tokens=16)
    assert err.value.code == "context_length_exceeded" and "256" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model="tiny", prompt=list(range(10, 10 + 300)))
    assert err.value.code == "context_length_exceeded"
    # without max_tokens, a prompt near the end of the context gets what is left (not the default 16)
    r = c.completions.create(model="tiny", prompt=list(range(10, 10 + 250)), temperature=0,
                             extra_body={"stop": None})  # fmt: skip
    assert r.usage.prompt_tokens == 250 and r.usage.total_tokens <= 256
    ref = model.generate(list(range(10, 10 + 250)), GenerationConfig(max_new_tokens=6))
    assert r.choices[0].text == ref.text


def counters(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    _, _, body = get(f"{url}/metrics")
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le") + "}"
                            if s.labels and "le" not in s.labels else "")  # fmt: skip
            if "le" not in s.labels:
                out[key] = s.value
    return out


def test_metrics_move(server):
    url, _ = server
    before = counters(url)
    r = client(url).completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=6, temperature=0)
    after = counters(url)

    def delta(k: str) -> float:
        return after.get(k, 0.0) - before.get(k, 0.0)

    assert delta("cscompile_requests_total{endpoint=completions,status=200}") == 1
    assert delta("cscompile_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("cscompile_generation_tokens_total") == r.usage.completion_tokens
    assert delta("cscompile_time_to_first_token_seconds_count") == 1
    assert delta("cscompile_inter_token_latency_seconds_count") == r.usage.completion_tokens - 1
    assert after["cscompile_queue_depth"] == 0 and after["cscompile_running_sequences"] == 0


@pytest.fixture(scope="module")
def native_model(tiny_dir, tmp_path_factory):
    """An int4 bundle run by the native engine (the default for real bundles)."""
    import warnings

    path = build_bundle(
        tiny_dir("llama-q-2l"), tmp_path_factory.mktemp("serve_q") / "tiny-q", precision="int4"
    ).path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = load(path, threads=1)
    with m:
        if m.engine.kind != "native":
            pytest.skip("the native engine is not the default on this CPU")
        yield m


@pytest.mark.parametrize("engine", ["dense", "native"])
def test_concurrent_greedy_requests_each_get_their_solo_answer(request, engine):
    """4 clients x 8 requests (completion/chat, stream or not), 4 sequences interleaved per token."""
    model = request.getfixturevalue("model" if engine == "dense" else "native_model")
    with serving(create_app(model, model_name="tiny", max_running=4, max_queue=8)) as url:
        check_concurrent(url, model)


def check_concurrent(url: str, model: Any) -> None:
    jobs = [(p, chat, stream) for p in PROMPTS for chat in (False, True) for stream in (False, True)]
    expected = {(p, chat): solo(model, p, chat, max_new_tokens=20).text for p, chat, _ in jobs}
    assert len(set(expected.values())) == len(expected)  # different prompts, different answers
    got: dict[tuple[str, bool, bool], str] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(mine: list[tuple[str, bool, bool]]) -> None:
        c = client(url)
        try:
            barrier.wait()
            for p, chat, stream in mine:
                kw: dict[str, Any] = dict(model="tiny", max_tokens=20, temperature=0, stream=stream)
                if chat:
                    r = c.chat.completions.create(messages=[{"role": "user", "content": p}], **kw)
                    text = ("".join(ch.choices[0].delta.content or "" for ch in r) if stream
                            else r.choices[0].message.content)  # fmt: skip
                else:
                    r = c.completions.create(prompt=p, **kw)
                    text = "".join(ch.choices[0].text for ch in r) if stream else r.choices[0].text
                got[(p, chat, stream)] = text
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(jobs[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    wrong = {k: v for k, v in got.items() if v != expected[k[:2]]}
    assert len(got) == len(jobs) and not wrong


class GatedBatcher:
    """The native bundle (batched), but the first generation waits for ``gate`` before it starts,
    so every request of a test is queued by then; records the size of every batched step.
    """

    def __init__(self, model: Any) -> None:
        self.model, self.tokenizer, self.context_length = model, model.tokenizer, model.context_length
        self.batch_limit, self.prefill_chunk = model.batch_limit, model.prefill_chunk
        self.gate = threading.Event()
        self.sizes: list[int] = []

    def stream(self, *args: Any, **kw: Any) -> Iterator[TokenEvent]:
        raise AssertionError("a batched engine's sequences are stepped, not streamed")

    def begin(self, *args: Any, **kw: Any) -> Any:
        assert self.gate.wait(60)
        return self.model.begin(*args, **kw)

    def step_batch(self, gens: list[Any]) -> list[list[TokenEvent]]:
        self.sizes.append(len(gens))
        return self.model.step_batch(gens)


def test_native_server_batches_and_each_request_gets_its_solo_answer(native_model):
    """Six concurrent requests (greedy and seeded sampling, a stop string, a prompt of more than two
    prefill chunks, chat and completions, streamed or not) advanced in batched steps: each answer
    is exactly ``generate`` run alone with the same settings.
    """
    assert native_model.batch_limit > 1 and native_model.prefill_chunk == 64
    long = " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    n_long = len(native_model.text_model.encode_prompt(long))
    assert 2 * 64 < n_long <= native_model.context_length - 16  # three prefill chunks
    sampled = dict(temperature=0.9, top_p=0.9)
    jobs: list[tuple[str, bool, bool, dict[str, Any]]] = [
        (PROMPTS[0], False, False, {}),
        (PROMPTS[1], True, True, {}),
        (PROMPTS[2], False, True, {**sampled, "seed": 7}),
        (PROMPTS[3], True, False, {**sampled, "seed": 8}),
        (long, False, True, {**sampled, "seed": 9}),
        (PROMPTS[2], False, False, {**sampled, "seed": 7, "stop": None}),  # its stop string: below
    ]
    ref7 = solo(native_model, PROMPTS[2], False, max_new_tokens=16, **sampled, seed=7).text
    stop = ref7[len(ref7) // 2 : len(ref7) // 2 + 2]
    assert stop.strip()
    jobs[5][3]["stop"] = (stop,)
    expected = [solo(native_model, p, chat, max_new_tokens=16, **kw).text for p, chat, _, kw in jobs]
    assert expected[5] != ref7 and len(set(expected)) == len(expected)
    gated = GatedBatcher(native_model)
    app = create_app(gated, model_name="tiny", max_running=6, max_queue=8)
    sched = app.state.server.scheduler
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        p, chat, stream, kw = jobs[i]
        body = {k: (list(v) if k == "stop" else v) for k, v in kw.items()}
        args: dict[str, Any] = {"model": "tiny", "max_tokens": 16, "temperature": 0, "stream": stream, **body}
        try:
            got[i] = ask(url, p, chat, args)
        except BaseException as exc:
            errors.append(exc)

    with serving(app) as url:
        card = client(url).models.list().data[0].model_extra
        assert card["batched_decode"] is True and "batched" in card["scheduling"]
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        wait_until(lambda: sched.running + sched.queue_depth == len(jobs), "every request to be queued")
        gated.gate.set()
        for t in threads:
            t.join(120)
    assert not errors, errors
    assert [got.get(i) for i in range(len(jobs))] == expected
    assert max(gated.sizes) >= 4  # the running sequences did share steps
    assert sched.running == 0


def test_a_cancelled_batched_stream_frees_its_slot(native_model):
    """Batched steps: a client that leaves mid-stream drops out of the batch (its slot and cache
    freed) while the other sequence goes on to its solo answer.
    """
    app = create_app(native_model, model_name="tiny", max_running=2, max_queue=0)
    sched = app.state.server.scheduler
    assert sched.batched
    ref = solo(native_model, PROMPTS[1], False, max_new_tokens=40, temperature=0.9, seed=3)
    with serving(app) as url:
        c = client(url)
        kw: dict[str, Any] = dict(model="tiny", max_tokens=200, temperature=0.9, seed=5, stream=True)
        with c.completions.create(prompt=PROMPTS[0], **kw) as s:
            other = iter(c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=40, temperature=0.9,
                                              seed=3, stream=True))  # fmt: skip
            pieces = [next(other).choices[0].text]
            for i, _ in enumerate(s):
                if i == 3:
                    break
        pieces += [ch.choices[0].text for ch in other]
        assert "".join(pieces) == ref.text
        wait_until(lambda: sched.running == 0, "the slots to be freed")


@pytest.fixture(scope="module")
def sensed_bundle(tiny_dir, tmp_path_factory):
    """An int4 bundle that ships a sensed vocabulary head (the build plans it)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        built = build_bundle(tiny_dir("llama-q-2l"), tmp_path_factory.mktemp("serve_v") / "tiny-v",
                             precision="int4", sensed_head="on")  # fmt: skip
        m = load(built.path, threads=1)
    with m:
        if m.engine.kind != "native" or m.session.sensed is None:
            pytest.skip("the native engine with a sensed head is not the default on this CPU")
    return built.path


def test_batched_greedy_requests_use_the_sensed_head_and_get_their_solo_answers(sensed_bundle, monkeypatch):
    """Five concurrent greedy requests and a sampled one on a bundle with a sensed head, advanced
    in batched steps: the greedy rows end with the sensed head (``forward_batch_sensed``), and
    every answer is ``generate`` run alone (which steps greedy tokens through the sensed head),
    and the greedy ones are also the full head's.
    """
    from cscompile.native.engine import NativeSession

    jobs: list[tuple[str, bool, bool, dict[str, Any]]] = [
        (PROMPTS[0], False, True, {}),
        (PROMPTS[1], True, False, {}),
        (PROMPTS[2], False, False, {}),
        (PROMPTS[3], True, True, {}),
        (PROMPTS[1], False, True, {}),
        (PROMPTS[0], False, True, {"temperature": 0.9, "seed": 4}),
    ]
    with load(sensed_bundle, threads=1, head="full") as full:
        assert full.session.sensed is None
        by_full = [solo(full, p, chat, max_new_tokens=16, **kw).text for p, chat, _, kw in jobs]
    calls: list[list[bool]] = []
    real = NativeSession.forward_batch_sensed

    def spy(self: Any, tokens: Any, states: Any, greedy: list[bool]) -> Any:
        calls.append(list(greedy))
        return real(self, tokens, states, greedy)

    monkeypatch.setattr(NativeSession, "forward_batch_sensed", spy)
    with load(sensed_bundle, threads=1) as model:
        assert model.session.sensed is not None and model.batch_limit > 1
        expected = [solo(model, p, chat, max_new_tokens=16, **kw).text for p, chat, _, kw in jobs]
        assert expected[:5] == by_full[:5] and not calls
        gated = GatedBatcher(model)
        app = create_app(gated, model_name="tiny", max_running=6, max_queue=8)
        sched = app.state.server.scheduler
        got: dict[int, str] = {}
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            p, chat, stream, kw = jobs[i]
            args: dict[str, Any] = {
                "model": "tiny",
                "max_tokens": 16,
                "temperature": 0,
                "stream": stream,
                **kw,
            }
            try:
                got[i] = ask(url, p, chat, args)
            except BaseException as exc:
                errors.append(exc)

        with serving(app) as url:
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
            for t in threads:
                t.start()
            wait_until(lambda: sched.running + sched.queue_depth == len(jobs), "every request to be queued")
            gated.gate.set()
            for t in threads:
                t.join(120)
        assert not errors, errors
        assert [got.get(i) for i in range(len(jobs))] == expected
        assert max(gated.sizes) >= 4 and any(sum(g) >= 4 and not all(g) for g in calls)
        assert sched.running == 0


def _live(*types: type) -> int:
    import gc

    gc.collect()
    return sum(isinstance(o, types) for o in gc.get_objects())


def test_no_request_state_outlives_its_request(native_model):
    """Three rounds of twelve requests over every path (streamed, whole, chat, a client that leaves
    mid-stream, a refused one) on the batched native server: afterwards no sequence, generation,
    native state or decoder (its KV cache) is alive, every slot is free, and the metrics hold as
    many series after the third round as after the first (no per-request labels).
    """
    from cscompile.decode.generate import Generation
    from cscompile.native.engine import NativeDecoder, NativeState
    from cscompile.serve.scheduler import Sequence

    kinds = (Sequence, Generation, NativeState, NativeDecoder)
    assert _live(*kinds) == 0
    app = create_app(native_model, model_name="tiny", max_running=3, max_queue=8)
    sched, registry = app.state.server.scheduler, app.state.server.metrics.registry
    series = []

    def one(c: Any, i: int) -> None:
        p, kw = PROMPTS[i % 4], dict(model="tiny", max_tokens=12, temperature=0)
        kind = i % 5
        if kind == 0:
            "".join(ch.choices[0].text for ch in c.completions.create(prompt=p, stream=True, **kw))
        elif kind == 1:
            c.completions.create(prompt=p, **kw)
        elif kind == 2:
            c.chat.completions.create(messages=[{"role": "user", "content": p}], **kw)
        elif kind == 3:
            with c.completions.create(prompt=p, stream=True, **{**kw, "max_tokens": 200}) as s:
                for j, _ in enumerate(s):
                    if j == 2:
                        break
        else:
            with pytest.raises(openai.BadRequestError):
                c.completions.create(prompt=p, **{**kw, "temperature": -1})

    with serving(app) as url:
        for _ in range(3):
            threads = [threading.Thread(target=lambda k=k: one(client(url), k)) for k in range(12)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            wait_until(lambda: sched.running == 0 and sched.queue_depth == 0, "the slots to be freed")
            wait_until(lambda: _live(*kinds) == 0, "every request's state to be freed")
            series.append(sum(len(m.samples) for m in registry.collect()))
        assert not sched._waiting and not sched._running
    assert series[0] == series[2], series


class Gated:
    """The tiny model, but every sequence waits for ``gate`` before its prefill."""

    def __init__(self, model: Any) -> None:
        self.model, self.tokenizer, self.context_length = model, model.tokenizer, model.context_length
        self.gate = threading.Event()

    def stream(self, *args: Any, **kw: Any) -> Iterator[TokenEvent]:
        assert self.gate.wait(60)
        yield from self.model.stream(*args, **kw)


def test_queue_full_is_429_with_retry_after(model):
    gated = Gated(model)
    app = create_app(gated, model_name="tiny", max_running=1, max_queue=1)
    with serving(app) as url:
        c = client(url)
        first = c.completions.create(
            model="tiny", prompt=PROMPTS[0], max_tokens=4, temperature=0, stream=True
        )
        second = c.completions.create(
            model="tiny", prompt=PROMPTS[1], max_tokens=4, temperature=0, stream=True
        )
        with pytest.raises(openai.RateLimitError) as err:
            c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4)
        assert err.value.status_code == 429 and err.value.response.headers["retry-after"] == "1"
        assert err.value.code == "queue_full"
        assert counters(url)["cscompile_requests_total{endpoint=completions,status=429}"] == 1
        gated.gate.set()
        assert (
            "".join(ch.choices[0].text for ch in first)
            == solo(model, PROMPTS[0], False, max_new_tokens=4).text
        )
        assert (
            "".join(ch.choices[0].text for ch in second)
            == solo(model, PROMPTS[1], False, max_new_tokens=4).text
        )
        r = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=4, temperature=0)
        assert r.choices[0].text == solo(model, PROMPTS[2], False, max_new_tokens=4).text


class Endless:
    """A sequence that never ends by itself; records how it was left."""

    def __init__(self, tokenizer: Any, limit: int | None = None) -> None:
        self.tokenizer, self.context_length, self.limit = tokenizer, None, limit
        self.closed = threading.Event()
        self.tokens = 0

    def stream(
        self, prompt: Any, config: Any = None, chat: bool = False, stats: Any = None
    ) -> Iterator[TokenEvent]:
        try:
            while self.limit is None or self.tokens < self.limit:
                time.sleep(0.002)
                self.tokens += 1
                yield TokenEvent(5, "a")
            if stats is not None:
                stats.new_tokens, stats.stop_reason = self.tokens, "length"
        finally:
            self.closed.set()


def test_a_cancelled_stream_frees_its_slot(model):
    endless = Endless(model.tokenizer)
    app = create_app(endless, model_name="tiny", max_running=1, max_queue=0)
    sched = app.state.server.scheduler
    with serving(app) as url:
        c = client(url)
        with c.completions.create(model="tiny", prompt="hi", stream=True) as s:
            for i, _ in enumerate(s):
                if i == 3:
                    break
        # the client is gone: the endless sequence is closed and its slot is free again
        wait_until(endless.closed.is_set, "the cancelled sequence to be closed")
        wait_until(lambda: sched.running == 0, "the slot to be freed")
        # non-streaming requests are cancelled too when their client leaves
        endless.closed.clear()
        with pytest.raises(openai.APITimeoutError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=0.5).completions.create(
                model="tiny", prompt="hi"
            )
        wait_until(endless.closed.is_set, "the abandoned request's sequence to be closed")
        wait_until(lambda: sched.running == 0, "the slot to be freed")


def test_a_waiting_request_that_leaves_frees_its_queue_place(model):
    from cscompile.serve.scheduler import QueueFull, Scheduler

    gated = Gated(model)
    sched = Scheduler(gated, max_running=1, max_queue=1)
    cfg = GenerationConfig(max_new_tokens=2)
    ids = model.tokenizer.encode(PROMPTS[0])

    async def scenario() -> str:
        running = sched.submit(ids, cfg)
        wait_until(lambda: sched.running == 1, "the first sequence to start")
        waiting = sched.submit(ids, cfg)
        with pytest.raises(QueueFull):
            sched.submit(ids, cfg)
        waiting.cancel()  # its client left before it got a slot
        assert sched.queue_depth == 0
        third = sched.submit(ids, cfg)  # the place is free again
        gated.gate.set()
        texts = []
        for seq in (running, third):
            texts.append("".join([ev.text async for ev in seq.events()]))
        assert [ev async for ev in waiting.events()] == []  # finished without running
        assert texts[0] == texts[1]
        return texts[0]

    try:
        assert asyncio.run(scenario()) == model.generate(PROMPTS[0], cfg).text
    finally:
        sched.close()


def test_shutdown_drains_running_requests(model):
    finite = Endless(model.tokenizer, limit=60)
    app = create_app(finite, model_name="tiny", max_running=1, max_queue=0)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server to start")
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    s = client(url).completions.create(model="tiny", prompt="hi", stream=True)
    it = iter(s)
    pieces = [next(it).choices[0].text]
    server.should_exit = True  # what SIGTERM does
    pieces += [ch.choices[0].text for ch in it]
    thread.join(30)
    assert not thread.is_alive()
    assert "".join(pieces) == "a" * 60  # the running request finished in full
    assert app.state.server.scheduler.running == 0 and not app.state.server.scheduler.accepting


def test_503_while_loading(bundle_path, monkeypatch):
    import cscompile.runtime

    release = threading.Event()
    real_load = cscompile.runtime.load

    def slow_load(*a: Any, **kw: Any) -> Any:
        assert release.wait(60)
        return real_load(*a, **kw)

    monkeypatch.setattr(cscompile.runtime, "load", slow_load)
    app = create_app(str(bundle_path), threads=1)
    with serving(app) as url:
        status, headers, body = get(f"{url}/health")
        assert status == 503 and json.loads(body)["status"] == "loading" and headers["retry-after"] == "1"
        with pytest.raises(openai.InternalServerError) as err:
            client(url).completions.create(model="tiny", prompt="hi", max_tokens=2)
        assert err.value.status_code == 503 and err.value.code == "loading"
        release.set()
        wait_until(lambda: get(f"{url}/health")[0] == 200, "the model to load")
        r = client(url).completions.create(model="tiny", prompt="hi", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens >= 1
    assert app.state.server.model.closed  # the app loaded it, so the app closed it


def test_astream_equals_generate_and_stops_when_closed(model):
    from cscompile.decode.generate import aiterate
    from cscompile.errors import UserError

    cfg = GenerationConfig(max_new_tokens=12)
    ref = model.generate(PROMPTS[3], cfg, chat=True)

    async def collect() -> list[TokenEvent]:
        return [ev async for ev in model.astream(PROMPTS[3], cfg, chat=True)]

    events = asyncio.run(collect())
    assert "".join(e.text for e in events) == ref.text
    assert [e.token_id for e in events if e.token_id >= 0] == ref.token_ids

    async def too_long() -> None:
        async for _ in model.astream(list(range(10, 300)), cfg):
            pass

    with pytest.raises(UserError, match="context"):
        asyncio.run(too_long())

    endless = Endless(model.tokenizer)

    async def take_three() -> int:
        it = aiterate(lambda: endless.stream("hi"))
        n = 0
        async for _ in it:
            n += 1
            if n == 3:
                break
        await it.aclose()
        return n

    assert asyncio.run(take_three()) == 3
    assert endless.closed.wait(20)  # the worker stopped between tokens and closed the generator


def test_cli_refuses_a_non_bundle(tmp_path, capsys):
    from cscompile.cli.main import main

    assert main(["serve", str(tmp_path / "missing.csb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bundle |") and len(err.splitlines()) == 1


def test_cli_refuses_a_taken_port(bundle_path, capsys):
    import socket

    from cscompile.cli.main import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", str(bundle_path), "--port", str(port), "--log-level", "warning"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --host/--port |") and str(port) in err and len(err.splitlines()) == 1


def test_serve_imports_no_compiler_and_runtime_no_server():
    code = (
        "import sys, cscompile.runtime\n"
        "assert not {'starlette', 'uvicorn', 'prometheus_client'} & set(sys.modules), 'runtime pulled the server'\n"
        "import cscompile.serve.app\n"
        "bad = [m for m in sys.modules if m.startswith(('cscompile.compiler', 'cscompile.cli', 'cscompile.steps'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _cdp(ws: Any, method: str, **params: Any) -> dict[str, Any]:
    """One Chrome DevTools Protocol call on the page's socket; its result."""
    _cdp.n = getattr(_cdp, "n", 0) + 1  # type: ignore[attr-defined]
    ws.send(json.dumps({"id": _cdp.n, "method": method, "params": params}))  # type: ignore[attr-defined]
    while True:
        msg = json.loads(ws.recv(timeout=30))
        if msg.get("id") == _cdp.n:  # type: ignore[attr-defined]
            assert "error" not in msg, msg
            return msg["result"]  # type: ignore[no-any-return]


def test_chat_page_in_headless_chromium(server, model, tmp_path):
    """The page as a user meets it: Debian's Chromium (headless) loads it from the server; the test
    types a message into the text box and presses Send through the DevTools protocol; the streamed
    answer shown in the page equals ``generate``'s, and the status line counts its tokens.
    """
    import shutil

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (tools/setup.sh installs Debian's package where apt can)")
    sync_client = pytest.importorskip("websockets.sync.client")
    url, _ = server
    profile = tmp_path / "profile"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--remote-debugging-port=0"]  # fmt: skip
    proc = subprocess.Popen(
        [chromium, *flags, f"{url}/"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            assert proc.poll() is None and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        pages = []
        while not pages:
            assert time.monotonic() < deadline, "chromium opened no page"
            targets = json.loads(get(f"http://127.0.0.1:{port}/json")[2])
            pages = [t for t in targets if t.get("type") == "page" and t.get("url", "").startswith(url)]
            time.sleep(0.1)
        with sync_client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None) as ws:

            def js(expr: str) -> Any:
                return _cdp(ws, "Runtime.evaluate", expression=expr, returnByValue=True)["result"].get(
                    "value"
                )

            while js("document.readyState") != "complete" or not (
                js("document.getElementById('model').textContent") or ""
            ).startswith("tiny"):
                assert time.monotonic() < deadline, "the page did not load the model"
                time.sleep(0.1)
            js("document.getElementById('max_tokens').value = '8';"
               "document.getElementById('input').value = 'The quick brown fox';"
               "document.getElementById('send').click()")  # fmt: skip
            ref = solo(model, "The quick brown fox", True, max_new_tokens=8)
            want = f"+ {len(ref.token_ids)} new tokens"
            while want not in (js("document.getElementById('status').textContent") or ""):
                assert time.monotonic() < deadline + 60, "no answer in the page"
                time.sleep(0.1)
            shown = js("Array.from(document.getElementById('log').children).map(e => e.textContent)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert shown[0].endswith("The quick brown fox")
    assert shown[-1].endswith(ref.text) and ref.text
