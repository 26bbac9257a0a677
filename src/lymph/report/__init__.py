"""The run report of ``lymph compare-baselines`` / ``lymph run`` and the ``lymph explain`` view.

- :mod:`lymph.report.markdown`: writes the report folder (``report.md``, figures, JSON);
- :mod:`lymph.report.analysis`: every report figure from the out-of-fold predictions, using
  :mod:`~lymph.report.cohort`, :mod:`~lymph.report.triage` (operating points),
  :mod:`~lymph.report.uncertainty` (bootstrap intervals), :mod:`~lymph.report.calibration`,
  :mod:`~lymph.report.decision` (decision curve) and :mod:`~lymph.report.drivers`;
- :mod:`lymph.report.clinical_md`: those sections in Markdown; :mod:`lymph.report.html`:
  ``report.html`` (offline, sortable patient table, cell galleries);
- :mod:`lymph.report.plots`: ROC and precision-recall curves of all models (out of fold);
- :mod:`lymph.report.montage`: cell montages (pixels from an image cache or the source files);
- :mod:`lymph.report.explain`: one patient's cells ordered by attention weight;
- :mod:`lymph.report.insample`: which patients a saved model trained on.
"""
