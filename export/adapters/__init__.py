"""Flows trained with other libraries, as :class:`~flowserve.export.flows.base.ServableModel`
modules: ``zuko`` (``zuko.flows.Flow``), ``nflows`` (``nflows.flows.Flow``) and ``sbi`` (sbi's
posteriors and flow estimators, served through the first two). Each module imports its
library, which comes with an optional extra (``flowserve[zuko]``, ``flowserve[nflows]``,
``flowserve[sbi]``), so import it only when you use it. ``builder`` loads a user's flow from a
Python file for ``flowserve export --module``."""
