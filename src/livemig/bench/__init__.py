"""``livemig bench``: the table of QEMU's qatzip-compression.rst, measured on this host.

* :mod:`.config`: the options, checked before anything runs (:class:`.config.BenchConfig`).
* :mod:`.model`: runs and rows (median/min/max), pure.
* :mod:`.results`: everything one bench measured (:class:`.results.Bench`) and its JSON.
* :mod:`.render`: the tables, header and footer, markdown and the memory table, pure.
* :mod:`.limits`: codec and loopback speeds, and the compute limit.
* :mod:`.runner`: one ``livemig migrate --local`` run in child processes.
* :mod:`.qemu_peer`: the same experiment with QEMU's migration, over QMP (``qemu.qmp``).
* :mod:`.plots`: PNG plots. :mod:`.cli`: the ``bench`` subcommand.
"""

from .model import BenchError, Row, Run, Stat, aggregate

__all__ = ["BenchError", "Row", "Run", "Stat", "aggregate"]
