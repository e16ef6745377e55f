"""``livemig bench``: the seed's table (qatzip-compression.rst) measured on this host.

* :mod:`.model`: runs and rows (median/min/max), pure.
* :mod:`.render`: the seed's table, markdown and the memory table, pure.
* :mod:`.limits`: codec and loopback speeds, and the compute limit.
* :mod:`.runner`: one ``livemig migrate --local`` run in child processes.
* :mod:`.qemu_peer` / :mod:`.qmp_client`: the same experiment with QEMU's migration.
* :mod:`.plots`: PNG plots. :mod:`.cli`: the ``bench`` subcommand.
"""

from .model import BenchError, Row, Run, Stat, aggregate

__all__ = ["BenchError", "Row", "Run", "Stat", "aggregate"]
