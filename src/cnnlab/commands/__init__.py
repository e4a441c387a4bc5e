"""Sub-commands beyond the core ones, one module each; listed here explicitly, in help order.

Each module has `register(command)`, where `command(name, help, handler)` returns the
sub-parser to add arguments to; handlers take the parsed arguments and return an exit code.
"""

from __future__ import annotations

from cnnlab.commands import bench, check, compare, explain, report, tune

COMMANDS: list = [
    check.register,
    report.register,
    compare.register,
    explain.register,
    tune.register,
    bench.register,
]
