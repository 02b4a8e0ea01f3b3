"""Flows trained with other libraries, as :class:`~flowserve.export.flows.base.ServableModel`
modules: ``zuko`` (``zuko.flows.Flow``) and ``nflows`` (``nflows.flows.Flow``). Each module
imports its library, which comes with an optional extra (``flowserve[zuko]``,
``flowserve[nflows]``), so import it only when you use it. ``builder`` loads a user's flow
from a Python file for ``flowserve export --module``."""
