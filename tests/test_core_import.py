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
