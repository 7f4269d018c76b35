"""Files that ship inside the package, found through ``importlib.resources`` (never repo-relative).

Every bundled file has a short name that ``optsel configs list/show/path`` and the loaders accept:

* run and prepare configs by stem: ``demo``, ``prepare_synthetic``, ``prepare_jsonl_example``;
* the rest by their folder: ``deepspeed/zero3.json``, ``slurm/optsel-torchrun.sbatch``,
  ``grafana/optsel-dashboard.json``, ``prometheus/alerts.yml``.

In a wheel these live under ``site-packages/optsel/{configs,launch/slurm,monitoring/...}``; in an
editable checkout they are the repository's ``configs/``, ``launch/slurm/`` and ``monitoring/`` folders.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

# short-name prefix -> (package, folder inside it, file patterns)
_GROUPS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "": ("optsel.configs", "", ("*.yaml",)),
    "deepspeed": ("optsel.configs", "deepspeed", ("*.json",)),
    "slurm": ("optsel.launch", "slurm", ("*.sbatch",)),
    "grafana": ("optsel.monitoring", "grafana", ("*.json",)),
    "prometheus": ("optsel.monitoring", "prometheus", ("*.yml",)),
}


def _folder(package: str, sub: str) -> Path:
    root = resources.files(package)
    folder = root / sub if sub else root
    # Installed from a wheel or an editable checkout, the package is a plain directory on disk.
    return Path(str(folder))


def configs_dir() -> Path:
    """The folder that holds the built-in run/prepare configs (and ``deepspeed/``)."""
    return _folder("optsel.configs", "")


def builtin_files() -> dict[str, Path]:
    """Every bundled file by its short name (see the module doc)."""
    out: dict[str, Path] = {}
    for prefix, (package, sub, patterns) in _GROUPS.items():
        folder = _folder(package, sub)
        for pattern in patterns:
            for path in sorted(folder.glob(pattern)):
                name = path.stem if not prefix else f"{prefix}/{path.name}"
                out[name] = path
    return dict(sorted(out.items()))


def builtin_path(name: str) -> Path:
    """The bundled file called ``name`` (``demo``, ``demo.yaml``, ``deepspeed/zero3.json``, ...)."""
    files = builtin_files()
    key = name[:-5] if name.endswith(".yaml") and "/" not in name else name
    if key not in files:
        raise FileNotFoundError(f"no built-in file named {name!r}; built-in: {', '.join(files)}")
    return files[key]


def default_deepspeed_config() -> str:
    """The DeepSpeed JSON used when ``engine.deepspeed_config`` is not set: the bundled ZeRO-3 config."""
    return str(builtin_path("deepspeed/zero3.json"))


def dashboard_path() -> Path:
    return builtin_path("grafana/optsel-dashboard.json")


def alert_rules_path() -> Path:
    return builtin_path("prometheus/alerts.yml")


def find_config(arg: str | Path) -> Path:
    """A config argument: an existing file path, else the name of a built-in config (``demo``).

    A file in the current directory wins over a built-in of the same name.
    """
    path = Path(arg)
    if path.is_file():
        return path
    text = str(arg)
    if "/" not in text and "\\" not in text:
        stem = text[:-5] if text.endswith(".yaml") else text
        candidate = configs_dir() / f"{stem}.yaml"
        if candidate.is_file():
            return candidate
    names = [n for n in builtin_files() if "/" not in n]
    raise FileNotFoundError(
        f"config file not found: {arg} (and no built-in config of that name; "
        f"built-in: {', '.join(names)}; see `optsel configs list`)"
    )
