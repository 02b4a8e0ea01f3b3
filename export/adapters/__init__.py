"""Flows trained with other libraries, as :class:`~flowserve.export.flows.base.ServableModel`
modules: ``zuko`` (``zuko.flows.Flow``). Each module imports its library, which comes with
an optional extra (``flowserve[zuko]``), so import it only when you use it."""
