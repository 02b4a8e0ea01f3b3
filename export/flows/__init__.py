"""The flow library: transforms, networks, the model base and one module per family.

``registry`` names the families and builds them from plain configs; importing it (or
this package) does not import torch, so the CLI can list the families cheaply.
"""
