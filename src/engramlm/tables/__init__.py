"""Table backends behind one interface (:class:`Table`)."""

from engramlm.tables.base import Table
from engramlm.tables.device import DeviceTable

__all__ = ["DeviceTable", "Table"]
