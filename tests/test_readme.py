"""The README's commands are the ones CI runs and the ones that exist."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_cmd = next(c for c in readme_commands() if "pytest" in c)
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"{test_cmd!r} is not a line of .ci/run"


def test_readme_train_command_names_a_real_config():
    train_cmd = next(c for c in readme_commands() if "train.py" in c)
    config = re.search(r"--config (\S+)", train_cmd).group(1)
    assert (ROOT / config).is_file(), config
    assert (ROOT / "train.py").is_file()
