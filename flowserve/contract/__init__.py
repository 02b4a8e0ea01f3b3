"""The contract between the build side and the runtime: tensor names, dtypes and shapes
(``spec``) and the metadata file of each exported flow (``metadata``). Standard library only."""
