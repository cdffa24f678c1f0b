"""`import reopold` and `import reopold.core` stay light: no heavy optional dependency is pulled in."""

import json
import subprocess
import sys

HEAVY = ("transformers", "vllm", "trl", "verl", "wandb", "accelerate", "deepspeed")


def test_import_does_not_pull_heavy_dependencies():
    # A fresh interpreter: this test process may already have imported anything.
    # torch must show up (reopold.core is torch code): proves the probe sees what was imported.
    code = (
        "import json, sys; import reopold; import reopold.core; "
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}); "
        "print(json.dumps({'heavy': heavy, 'torch': 'torch' in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"heavy": [], "torch": True}
