"""The engine registry: every engine kind a manifest may name has a loader, every loader's session
implements the Session protocol, and an unknown kind is a one-line error."""

import pytest

from cscompile.bundle.format import ENGINE_KINDS
from cscompile.compiler.build import build_bundle
from cscompile.decode.session import Session
from cscompile.errors import UserError
from cscompile.runtime import GenerationConfig, load
from cscompile.runtime.engines import LOADERS, LoadRequest, load_session


def test_every_manifest_engine_kind_has_a_loader():
    assert set(LOADERS) == set(ENGINE_KINDS)


@pytest.fixture(scope="module")
def int4_bundle(tiny_dir, tmp_path_factory):
    return build_bundle(tiny_dir("llama-q-2l"), tmp_path_factory.mktemp("eng") / "b", precision="int4").path


def test_each_engine_loads_through_the_registry_as_a_session(int4_bundle, monkeypatch):
    from cscompile.bundle import open_bundle

    calls = []
    for kind, fn in list(LOADERS.items()):
        monkeypatch.setitem(LOADERS, kind, lambda req, fn=fn: calls.append(req.engine.kind) or fn(req))
    with open_bundle(int4_bundle) as b:
        kinds = {e.name: e.kind for e in b.engines}
    assert {"dense", "native"} <= set(kinds.values())
    for name, kind in kinds.items():
        calls.clear()
        with load(int4_bundle, engine=name) as m:
            assert isinstance(m.session, Session), f"{name}: {type(m.session).__name__} is not a Session"
            assert calls == [kind]  # loaded by its kind's loader, once
            out = m.generate([1, 5, 9], GenerationConfig(max_new_tokens=4))
            assert len(out.token_ids) == 4


def test_unknown_engine_kind_is_one_line(int4_bundle):
    import dataclasses

    from cscompile.bundle import open_bundle

    with open_bundle(int4_bundle) as b:
        fake = dataclasses.replace(b.engines[0], kind="quantum")
        req = LoadRequest(b, fake, None, True, False, True, None, None)
        with pytest.raises(UserError, match="has the kind 'quantum'"):
            load_session(req)
