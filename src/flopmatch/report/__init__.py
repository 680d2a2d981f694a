"""The study report: a pure function of a study directory's files (run directories, the timing phase's
``inference_timing.json`` and ``study.json`` when present).

``data`` (files -> rows), ``records`` (frontiers, iso-FLOP curves, Pareto fronts), ``powerlaw``
(trend fits), ``bootstrap`` (intervals of fits, crossovers), ``analysis`` (what is fitted, and when a
law may be), ``stats`` (small-sample tests), ``verdicts`` (the paper's claims and the recommendation
table, every test in a Holm-corrected family), ``findings`` (:func:`~flopmatch.report.findings.analyse`
runs the whole analysis; the EMA analysis), ``plots`` (figures), ``render`` (Markdown and HTML) and
``build`` (:func:`~flopmatch.report.build.build_report`).
"""
