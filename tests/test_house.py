"""House rules a reader relies on (issue 25): no function of the code takes more than 8 parameters or returns a
tuple of more than 4 values, so that nothing is passed by position in bundles. Aside, as the rule says: Triton
kernels (@triton.jit: their arguments are the kernel's pointers and sizes) and autograd's backward passes (a gradient
for every input), which for a torch.library op is its backward op and that op's fake (flat tensors by its schema)."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_PARAMS, MAX_RETURNED = 8, 4


def _is_aside(node: ast.FunctionDef, backward_ops: set[str]) -> bool:
    decorators = [ast.unparse(d) for d in node.decorator_list]
    if any(d.endswith("jit") for d in decorators) or node.name in ("backward", "_backward"):
        return True
    # a fake of a backward op
    ops = {d.split(".")[0] for d in decorators if d.endswith(".register_fake")}
    return node.name in backward_ops or bool(ops & backward_ops)


def house_violations(paths) -> list[str]:
    found = []
    for path in paths:
        tree = ast.parse(open(path, encoding="utf-8").read())
        functions = [
            n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        backward_ops = {n.name for n in functions if n.name.endswith("_bwd")}
        for node in functions:
            if _is_aside(node, backward_ops):
                continue
            a = node.args
            names = [
                p.arg
                for p in a.posonlyargs + a.args + a.kwonlyargs
                if p.arg not in ("self", "cls", "ctx")
            ]
            n_params = len(names) + (a.vararg is not None) + (a.kwarg is not None)
            where = f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}"
            if n_params > MAX_PARAMS:
                found.append(f"{where} takes {n_params} parameters")
            for r in ast.walk(node):
                if (
                    isinstance(r, ast.Return)
                    and isinstance(r.value, ast.Tuple)
                    and len(r.value.elts) > MAX_RETURNED
                ):
                    found.append(f"{where} returns a tuple of {len(r.value.elts)}")
    return found


def test_no_function_takes_more_than_8_parameters_or_returns_more_than_4_values():
    paths = sorted(
        glob.glob(os.path.join(ROOT, "*.py"))
        + glob.glob(os.path.join(ROOT, "crlft_kernels", "*.py"))
    )
    assert len(paths) > 10
    assert house_violations(paths) == []


def test_the_check_finds_what_it_should(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "def many(a, b, c, d, e, f, g, h, i):\n    return a, b, c, d, e\n\n"
        "def fine(a, *args, **kw):\n    return a, args, kw\n\n"
        "@triton.jit\ndef kernel(a, b, c, d, e, f, g, h, i):\n    pass\n\n"
        "def op_bwd(a, b, c, d, e, f, g, h, i):\n    pass\n\n"
        "@op_bwd.register_fake\ndef _(a, b, c, d, e, f, g, h, i):\n    pass\n"
    )
    found = house_violations([str(bad)])
    assert (
        len(found) == 2
        and "many takes 9 parameters" in found[0]
        and "many returns a tuple of 5" in found[1]
    )
