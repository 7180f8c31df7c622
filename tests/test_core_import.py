"""The core package never imports a framework."""

import subprocess
import sys


def test_import_unickpt_loads_no_framework():
    code = (
        "import sys, tempfile, numpy as np, unickpt\n"
        "p = tempfile.mkdtemp() + '/c'\n"
        "unickpt.save(p, {'a': np.arange(3)})\n"
        "unickpt.load(p); unickpt.inspect(p); unickpt.verify(p)\n"
        "bad = [m for m in ('torch', 'jax', 'jaxlib', 'flax', 'optax', 'orbax') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


_HIDE = """
import sys, importlib.abc
class _Hide(importlib.abc.MetaPathFinder):
    # make these packages uninstalled, as on a machine with only numpy, msgpack and ml_dtypes
    names = {"xxhash", "typer", "rich", "torch", "jax", "jaxlib", "flax", "optax", "orbax",
             "safetensors", "hypothesis"}
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.names:
            raise ImportError(f"{name} hidden by the test")
sys.meta_path.insert(0, _Hide())
"""


def test_load_needs_only_numpy_msgpack_ml_dtypes(tmp_path):
    import ml_dtypes
    import numpy as np

    import unickpt

    tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.ones(3, dtype=ml_dtypes.bfloat16), "step": 7, "name": "run"}
    unickpt.save(tmp_path / "ck", tree)
    code = _HIDE + (
        "import warnings, numpy as np, ml_dtypes, unickpt\n"
        f"p = {str(tmp_path / 'ck')!r}\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    t = unickpt.load(p)\n"
        "assert any('xxhash package is not installed' in str(x.message) for x in w), w\n"
        "assert t['step'] == 7 and t['name'] == 'run'\n"
        "assert t['w'].tobytes() == np.arange(6, dtype=np.float32).tobytes()\n"
        "assert t['b'].dtype == ml_dtypes.bfloat16 and t['b'].tobytes() == "
        "np.ones(3, ml_dtypes.bfloat16).tobytes()\n"
        "print(unickpt.inspect(p).total_bytes)\n"
        "for call in (lambda: unickpt.verify(p), lambda: unickpt.save(p + '2', {'a': 1})):\n"
        "    try:\n"
        "        call()\n"
        "    except unickpt.MissingDependencyError as e:\n"
        "        assert 'pip install xxhash' in str(e) and isinstance(e, ImportError), e\n"
        "    else:\n"
        "        raise AssertionError('expected MissingDependencyError')\n"
        "import os; assert not any(n.startswith('.unickpt') or n == 'ck2' "
        "for n in os.listdir(os.path.dirname(p)))\n"
        "hidden = [m for m in ('xxhash', 'typer', 'rich', 'torch', 'jax') if m in sys.modules]\n"
        "assert not hidden, hidden\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip() == "30"
