"""``cscompile.serve.ray_app``: the OpenAI app on two Ray Serve replicas of a tiny bundle.

A local Ray (2 CPUs, 127.0.0.1, no dashboard) started by the test; the real ``openai`` client
gets the answers ``model.generate`` gives alone (greedy and seeded sampling), and the
``x-cscompile-replica`` header shows that both replicas answered.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from cscompile.compiler.build import build_bundle  # noqa: E402
from cscompile.runtime import GenerationConfig, load  # noqa: E402
from cscompile.serve.ray_app import NAME, build_app  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def bundle_path(tiny_dir, tmp_path_factory):
    return build_bundle(
        tiny_dir("llama-2l"), tmp_path_factory.mktemp("ray") / "tiny.csb", precision="fp32"
    ).path


@pytest.fixture(scope="module")
def ray_url(bundle_path):
    from ray import serve

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(bundle_path, replicas=2, threads=1, num_cpus=0.5, model_name="tiny"), name=NAME)
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_like_generate(ray_url, bundle_path):
    client = openai.OpenAI(base_url=f"{ray_url}/v1", api_key="unused", max_retries=0, timeout=120)
    cases: list[tuple[str, bool, dict[str, Any]]] = [
        ("The quick brown fox", False, {"temperature": 0}),
        ("Once upon a time", True, {"temperature": 0}),
        ("def f(x):", False, {"temperature": 0.9, "top_p": 0.95, "seed": 7}),
    ]
    with load(bundle_path, threads=1) as model:
        refs = [
            model.generate(p, GenerationConfig(max_new_tokens=10, **kw), chat=chat).text
            for p, chat, kw in cases
        ]
    assert all(refs) and len(set(refs)) == len(refs)  # the comparisons below are not vacuous
    replicas: set[str] = set()
    for i in range(24):
        prompt, chat, kw = cases[i % len(cases)]
        if chat:
            raw = client.chat.completions.with_raw_response.create(
                model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=10, **kw
            )
            text = raw.parse().choices[0].message.content
        else:
            raw = client.completions.with_raw_response.create(
                model="tiny", prompt=prompt, max_tokens=10, **kw
            )
            text = raw.parse().choices[0].text
        assert text == refs[i % len(cases)], (i, prompt)
        replicas.add(raw.headers["x-cscompile-replica"])
        if len(replicas) == 2 and i >= len(cases):
            break
    assert len(replicas) == 2, f"one replica answered every request: {replicas}"
