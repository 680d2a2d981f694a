"""The study report: a pure function of run directories.

``data`` (run directories -> rows), ``records`` (frontiers, iso-FLOP curves, Pareto fronts), ``powerlaw``
(trend fits), ``bootstrap`` (intervals, crossovers, head-to-head comparisons),
``analysis`` (fits, head-to-head comparisons and crossovers of a study), ``findings`` (the paper's
findings and the recommendations; :func:`~flopmatch.report.findings.analyse` runs the whole analysis),
``plots`` (figures), ``render`` (Markdown and HTML) and ``build`` (:func:`~flopmatch.report.build.build_report`).
"""
