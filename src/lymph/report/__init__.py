"""The run report of ``lymph compare-baselines`` and the ``lymph explain`` view.

- :mod:`lymph.report.plots`: ROC and precision-recall curves of all models (out of fold);
- :mod:`lymph.report.montage`: cell montages (pixels from an image cache or the source files);
- :mod:`lymph.report.markdown`: ``report.md`` with the table, paired comparison, plots and
  montages of the misclassified patients;
- :mod:`lymph.report.explain`: one patient's cells ordered by attention weight.
"""
