"""Device-agnostic code: every tensor the optimizers and the mathematics create is placed on the
device of the data it belongs to (there is no GPU here, so this is checked statically: a factory
call without ``device=`` in these modules would put a tensor on the CPU next to CUDA data)."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "pmptrain"
#: the modules that run inside an optimizer step (files, export and the bench read/write on the CPU by design)
MODULES = ["hamiltonian.py", "capture.py", "discrete.py", "fallback.py", "distributed.py", "modules.py",
           "quant.py", "_profile.py"] + [f"optim/{p.name}" for p in sorted((PKG / "optim").glob("*.py"))]
FACTORIES = {"zeros", "ones", "empty", "eye", "tensor", "arange", "full", "rand", "randn", "randint", "linspace"}
#: (module, function): CPU on purpose — bit packing for the packed export format
ALLOWED = {("discrete.py", "pack_codes"), ("discrete.py", "unpack_codes")}


def _violations(path: Path, rel: str):
    tree = ast.parse(path.read_text())
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        if (rel, fn.name) in ALLOWED:
            continue
        for node in ast.walk(fn):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES
                    and not any(k.arg in ("device", "out") for k in node.keywords)):
                out.append(f"{rel}:{node.lineno} torch.{node.func.attr}(...) in {fn.name}() has no device=")
    return out


@pytest.mark.parametrize("rel", MODULES)
def test_tensor_factories_name_their_device(rel):
    path = PKG / rel
    if not path.exists():
        pytest.skip(f"{rel} does not exist")
    assert _violations(path, rel) == []
