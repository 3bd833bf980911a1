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


def test_every_library_name_the_readme_shows_exists():
    """``dj.<name>``, ``diffusion_jax.<module>[.<name>]``, ``from diffusion_jax.<module> import
    a, b`` and `<subpackage>.<name>` (e.g. `evaluation.make_bpd_fn`) in the README all resolve."""
    import importlib
    import pkgutil

    import diffusion_jax

    text = (ROOT / "README.md").read_text()
    names = {f"diffusion_jax{n}" for n in re.findall(r"\bdj((?:\.\w+)+)", text)}
    names.update(re.findall(r"(?<![\w/.])(diffusion_jax(?:\.\w+)+)", text))
    for module, imported in re.findall(r"from (diffusion_jax[\w.]*) import ([\w, ]+)", text):
        names.update(f"{module}.{n.strip()}" for n in imported.split(","))
    submodules = {m.name for m in pkgutil.iter_modules(diffusion_jax.__path__)}
    for first, rest in re.findall(r"`(\w+)((?:\.\w+)+)", text):
        if first in submodules:
            names.add(f"diffusion_jax.{first}{rest}")
    assert (
        "diffusion_jax.make_sampler" in names and "diffusion_jax.checkpoints.load_sampler" in names
    )

    def resolves(name: str) -> bool:
        parts = name.split(".")
        for i in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                obj = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            try:
                for attr in parts[i:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                return False
            return True
        return False

    missing = sorted(n for n in names if not resolves(n))
    assert not missing, f"the README names what does not exist: {missing}"


def test_readme_and_notebooks_name_the_repository_of_pyproject():
    """The Colab badges and the TPU example's clone URL are pyproject.toml's [project.urls]
    Repository, the one place a fork changes it (the notebook builder reads it from there)."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Repository"]
    owner_name = url.removeprefix("https://github.com/")
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", owner_name), url
    text = (ROOT / "README.md").read_text()
    badges = re.findall(r"colab\.research\.google\.com/github/([^/\s]+/[^/\s]+)/blob/", text)
    clones = re.findall(r"REPO=([^\s`]+)", text)
    assert len(badges) >= 5 and clones, "the README lost its Colab badges or its REPO= example"
    assert set(badges) == {owner_name}, badges
    assert set(clones) == {url + ".git"}, clones
    notebooks = sorted((ROOT / "colab").glob("*.ipynb"))
    assert notebooks
    for path in notebooks:  # built from the same setting (test_notebooks checks they are current)
        source = path.read_text()
        assert (
            f"colab.research.google.com/github/{owner_name}/blob/main/colab/{path.name}" in source
        )
        assert f'REPO = \\"{url}\\"' in source, path.name
