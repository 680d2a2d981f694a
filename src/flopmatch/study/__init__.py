"""Studies: the compute-matched comparison as a grid of runs.

``presets`` (named StudyConfigs), ``plan`` (the grid with analytic FLOPs), ``job`` (one cell: train,
then evaluate), ``launchers`` (in-process or local worker processes), ``worker`` (a worker's entry
point) and ``runner`` (:func:`~flopmatch.study.runner.study`, the whole pipeline).
"""
