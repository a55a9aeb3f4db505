"""The README's test command is what CI runs."""
import os
import re

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme.split("## Tests", 1)[1]
    command = re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().splitlines()
    assert command in [line.strip() for line in ci], "README test command %r not in .ci/run" % command


def test_readme_layer_example_runs():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    blocks = re.findall(r"```python\n(.+?)\n```", readme, re.S)
    layer_code = next(b for b in blocks if "register_layer(\"Square\")" in b)
    check_code = next(b for b in blocks if "check_gradient" in b)
    scope = {}
    exec(layer_code, scope)
    exec(check_code.replace("print(", "result = ("), scope)
    assert scope["result"].ok and scope["result"].checked == 24
