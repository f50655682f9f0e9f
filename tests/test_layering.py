"""Imports only go down: kernels <- attention <- conversions <- eval, cli. Layer 0 never imports transformers."""

import ast
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hf_efficient_attn"
LAYER = {"kernels": 0, "attention": 1, "conversions": 2, "eval": 3, "cli": 3}


def _layer_of(parts):
    return LAYER.get(parts[0]) if parts else None


def _imports(path: Path):
    """(module parts relative to hf_efficient_attn) for every import of our own package in a file."""
    rel = path.relative_to(PKG).with_suffix("").parts
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the file's package
                base = list(rel[:-1])[: len(rel) - node.level] if node.level > 1 else list(rel[:-1])
                target = base + (node.module.split(".") if node.module else [])
                names = [a.name for a in node.names]
                yield target if node.module else base + names[:1]
            elif node.module and node.module.startswith("hf_efficient_attn"):
                yield node.module.split(".")[1:]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("hf_efficient_attn."):
                    yield a.name.split(".")[1:]


def test_imports_only_go_down():
    bad = []
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        own = _layer_of(parts)
        if own is None:
            continue
        for target in _imports(path):
            other = _layer_of(list(target))
            if other is not None and other > own:
                bad.append(f"{path.relative_to(PKG)} imports {'.'.join(target)}")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_kernels_import_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import hf_efficient_attn.kernels.softmax as s\n"
        "import pkgutil, importlib, hf_efficient_attn.kernels as k\n"
        "for m in pkgutil.walk_packages(k.__path__, 'hf_efficient_attn.kernels.'): importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]
