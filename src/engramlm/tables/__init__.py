"""Table backends behind one interface (:class:`Table`), placed by a :class:`TablePlan`."""

from engramlm.tables.base import Table
from engramlm.tables.device import DeviceTable
from engramlm.tables.disk import DiskStore, TableFileError, disk_table
from engramlm.tables.offload import MemoryStore, OffloadedTable, RowStore, TableAdam
from engramlm.tables.plan import TablePlan, build_table, convert_table

__all__ = [
    "DeviceTable",
    "DiskStore",
    "MemoryStore",
    "OffloadedTable",
    "RowStore",
    "Table",
    "TableAdam",
    "TableFileError",
    "TablePlan",
    "build_table",
    "convert_table",
    "disk_table",
]
