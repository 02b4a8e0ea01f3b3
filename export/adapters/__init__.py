"""Flows trained with other libraries, as :class:`~flowserve.export.flows.base.ServableModel`
modules: ``zuko`` (``zuko.flows.Flow``), ``nflows`` (``nflows.flows.Flow``), ``normflows``
(``NormalizingFlow`` and ``ConditionalNormalizingFlow``) and ``sbi`` (sbi's posteriors and
flow estimators, served through the zuko and nflows adapters). Each module imports its
library, which comes with an optional extra (``flowserve[zuko]``, ``flowserve[nflows]``,
``flowserve[normflows]``, ``flowserve[sbi]``), so import it only when you use it;
``nflows_layers`` holds the layers nflows wrote and normflows copied, and imports neither.
``builder`` loads a user's flow from a Python file for ``flowserve export --module``."""
