"""Every tensor tflow makes names its device: a torch factory call (`torch.zeros`, `torch.tensor`, ...)
in tflow/ or generators/ passes `device=` (`device="cpu"` for a tensor made on the host on purpose,
with a comment saying why), unless it builds a module: inside an `__init__`, an `nn.Parameter(...)`
or a `register_buffer(...)`, it becomes a parameter or buffer that moves with its module. Without
a device, a factory makes its tensor on the CPU (or the default device), which a CUDA run meets as
a device mismatch on its first query."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FACTORIES = {"zeros", "ones", "full", "empty", "arange", "tensor", "as_tensor", "randn", "rand", "randint",
             "randperm", "eye", "linspace", "logspace"}
OWNERS = {"Parameter", "register_buffer"}  # a tensor handed to these moves with its module


def sources() -> list[Path]:
    return sorted(p for folder in ("tflow", "generators") for p in (ROOT / folder).rglob("*.py"))


def is_factory(node: ast.AST) -> bool:
    f = node.func if isinstance(node, ast.Call) else None
    return (isinstance(f, ast.Attribute) and f.attr in FACTORIES and isinstance(f.value, ast.Name)
            and f.value.id == "torch")


def builds_a_module(node: ast.Call, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether the call sits in an `__init__`, or inside an `nn.Parameter(...)` or `register_buffer(...)` call."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            return True
        f = node.func if isinstance(node, ast.Call) else None
        if isinstance(f, ast.Attribute | ast.Name) and (f.attr if isinstance(f, ast.Attribute) else f.id) in OWNERS:
            return True
    return False


def problems(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line: torch.name` for each factory call in `path` that names no device."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return [f"{path.relative_to(root)}:{node.lineno}: torch.{node.func.attr}" for node in ast.walk(tree)
            if is_factory(node) and not builds_a_module(node, parents)
            and not any(k.arg == "device" for k in node.keywords)]


def test_every_factory_call_names_its_device():
    found = [p for path in sources() for p in problems(path)]
    assert not found, "no device= (pass the model's or an input's device):\n" + "\n".join(found)


SLIPS = {
    "torch.zeros(3, 4)": 1,
    "torch.tensor(ids, dtype=torch.long)": 1,
    "torch.arange(n, device=x.device)": 0,
    'torch.tensor(ids, device="cpu")  # cpu: counted on the host': 0,
    "nn.Parameter(torch.randn(4, 4) * 0.02)": 0,
    'self.register_buffer("mask", torch.ones(4))': 0,
    "x.new_zeros(3)": 0,
}


@pytest.mark.parametrize("line, expected", SLIPS.items())
def test_the_audit_flags_a_factory_without_a_device_outside_module_building(tmp_path, line, expected):
    source = tmp_path / "module.py"
    source.write_text(f"import torch\nfrom torch import nn\n\n\ndef f(x, ids, n, self):\n    return {line}\n\n\n"
                      f"class M(nn.Module):\n    def __init__(self, x, ids, n):\n        self.w = {line}\n")
    assert problems(source, tmp_path) == ["module.py:6: " + line.split("(")[0]] * expected
