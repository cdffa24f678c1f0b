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


def probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_cli_help_and_config_errors_do_not_import_torch():
    # `reopold --help`, `reopold train --help` and a bad config key all answer before torch or transformers load.
    code = (
        "import json, sys, contextlib, io; from reopold.cli import main\n"
        "codes = []\n"
        "for argv in (['--help'], ['train', '--help'], ['train', '--algo.lamda', '0.3'], ['train', '--algo.name', "
        "'reopld'], ['keys']):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):\n"
        "        try: codes.append(main(argv))\n"
        "        except SystemExit as e: codes.append(e.code)\n"
        "print(json.dumps({'codes': codes, 'torch': 'torch' in sys.modules, "
        "'transformers': 'transformers' in sys.modules}))"
    )
    assert probe(code) == {"codes": [0, 0, 2, 2, 0], "torch": False, "transformers": False}


def test_import_reopold_alone_loads_nothing_heavy_until_core_is_used():
    code = ("import json, sys; import reopold; before = 'torch' in sys.modules; reopold.reopold_loss; "
            "print(json.dumps({'before': before, 'after': 'torch' in sys.modules}))")
    assert probe(code) == {"before": False, "after": True}
