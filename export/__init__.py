"""The torch side of flowserve (the ``export`` extra): the flow library (``flows``), data
sets (``data``), training and checkpoints (``training``), export to a Triton repository
(``exporter``), the quality report (``quality``) and plots (``plots``).

Nothing here is imported by the gateway; this package imports the contract
(:mod:`flowserve.contract.spec`, :mod:`flowserve.contract.metadata`) and nothing else of flowserve.
"""
