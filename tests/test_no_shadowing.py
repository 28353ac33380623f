"""No module or package at the project's root may share its import name with an installed distribution: run from
the root (python train.py, pytest, a user's own script), ours is found first and shadows it for every program,
as our old `kernels/` shadowed Hugging Face's `kernels` that transformers imports."""

import importlib.metadata
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def root_import_names(root: str) -> list[str]:
    """What `import NAME` finds at `root` before site-packages: NAME.py, or NAME/ with an __init__.py (a folder
    without one is a namespace portion, which any installed package of that name wins over)."""
    names = []
    for entry in sorted(os.listdir(root)):
        path = os.path.join(root, entry)
        if entry.endswith(".py") and os.path.isfile(path):
            names.append(entry[:-3])
        elif os.path.isfile(os.path.join(path, "__init__.py")) and entry.isidentifier():
            names.append(entry)
    return names


def clashes(root: str) -> list[str]:
    # import name -> the distributions providing it
    installed = importlib.metadata.packages_distributions()
    return [
        f"{root}/{name}: {', '.join(installed[name])} (installed) provides the import name {name!r} too"
        for name in root_import_names(root)
        if name in installed
    ]


def test_no_project_module_shadows_an_installed_distribution():
    assert root_import_names(ROOT), "found no project module at all"
    assert "crlft_kernels" in root_import_names(ROOT) and "train" in root_import_names(ROOT)
    found = clashes(ROOT)
    assert not found, "rename ours: " + "; ".join(found)


def test_the_check_sees_a_clash(tmp_path):
    """The check above can fail: a root with a tqdm.py (tqdm is installed) and a torch/ package is refused by name."""
    (tmp_path / "tqdm.py").write_text("")
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("")
    (tmp_path / "numpy").mkdir()  # no __init__.py: a namespace portion, shadows nothing
    (tmp_path / "our_own_module.py").write_text("")
    found = clashes(str(tmp_path))
    assert len(found) == 2, found
    assert "tqdm: tqdm (installed)" in found[1] and "torch: torch (installed)" in found[0], found
