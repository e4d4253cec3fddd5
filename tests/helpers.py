"""Helpers shared by the test modules."""

import contextlib

import torch

from irrepscope.cli import main


@contextlib.contextmanager
def default_dtype(dtype):
    """Build e3nn modules in ``dtype``: e3nn computes its Clebsch-Gordan constants in the default dtype,
    so a float32-built product cast to float64 is only float32-accurate (and only that equivariant)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def assert_rel_close(actual, expected, tol, what=""):
    """Largest absolute difference relative to the largest expected magnitude, below ``tol``."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = ((actual - expected).abs().max() / scale).item()
    assert err < tol, f"{what}: relative error {err:.3g} > {tol:g}"


def run_cli(*args: str) -> int:
    """Run the CLI in-process as a user would; return its exit status (0 when it returned normally)."""
    try:
        main(list(args))
    except SystemExit as exc:
        return exc.code
    return 0


def one_line_error(capsys, code: int, match: str) -> str:
    """Assert that a CLI call failed with status 2 and one ``error:`` line containing ``match``; return the line."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    assert match in err, err
    return err


def scale_order_paths(model, l: int, factor: float) -> None:
    """Scale the radial MLP's output columns of every path that reads or writes order ``l``, in every block."""
    import numpy as np
    import torch

    with torch.no_grad():
        for block in model.blocks:
            start = 0
            for ins in block.tp.instructions:
                n = int(np.prod(ins.path_shape))
                if block.tp.irreps_in1[ins.i_in1].ir.l == l or block.tp.irreps_out[ins.i_out].ir.l == l:
                    block.fc.layer1.weight[:, start : start + n] *= factor
                start += n
