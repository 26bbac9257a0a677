"""What drives the chosen model's prediction.

- **Coefficients across folds** (late fusion, or any model exposing ``coefficients()``): the
  fusion regression's standardised coefficients as fitted in each training fold; mean,
  standard deviation and the fraction of folds that agree with the mean's sign. On
  standardised inputs a coefficient is the change in log-odds of malignancy per standard
  deviation of the input.
- **Named measurements** (a morphometry store): for each measurement, (a) its association
  with the label: the ROC AUC of the patient's mean value for malignant vs reactive
  (``sklearn.metrics.roc_auc_score``; 0.5 = none, above 0.5 = higher in malignant); (b) how
  it moves the image score: the Spearman correlation (``scipy.stats.spearmanr``) between the
  cell's value and its out-of-fold cell score (the score the fold model that did not see the
  patient gave the cell). Only patients scored out of fold enter either figure.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOP = 12


def coefficient_table(coefs: list[dict[str, float]]) -> list[dict[str, Any]]:
    """One row per input, by |mean| (largest first)."""
    if not coefs:
        return []
    names = list(coefs[0])
    M = np.array([[c.get(n, np.nan) for n in names] for c in coefs], dtype=np.float64)
    mean, std = np.nanmean(M, axis=0), np.nanstd(M, axis=0)
    agree = np.mean(np.sign(M) == np.sign(mean)[None, :], axis=0)
    rows = [{"input": n, "mean": float(mean[j]), "std": float(std[j]),
             "sign_agreement": float(agree[j]), "folds": int(M.shape[0])}
            for j, n in enumerate(names)]
    return sorted(rows, key=lambda r: -abs(r["mean"]))


def measurement_table(store: Any, scored: np.ndarray, cell_scores: dict[str, np.ndarray]
                      ) -> list[dict[str, Any]]:
    """Per named measurement: label AUC of the patient mean, Spearman with the cell score.
    ``scored``: store rows scored out of fold (labelled). Empty without named columns."""
    from scipy.stats import spearmanr
    from sklearn.metrics import roc_auc_score

    from lymph.report.explain import _SKIP_COLUMNS, _named

    cols = list(store.feature_columns or [])
    if not _named(cols) or scored.size == 0:
        return []
    y = np.asarray(store.labels)[scored].astype(np.int64)
    ptr = np.asarray(store.patient_ptr)
    emb = store.embeddings
    means = np.stack([np.asarray(emb[ptr[i]:ptr[i + 1]], dtype=np.float64).mean(axis=0)
                      for i in scored])  # (patients, F): one mean per patient (reporting only)
    have = [i for i in scored if str(store.ids[i]) in cell_scores]
    if have:
        X = np.concatenate([np.asarray(emb[ptr[i]:ptr[i + 1]], dtype=np.float64) for i in have])
        s = np.concatenate([cell_scores[str(store.ids[i])] for i in have])
    two = np.unique(y).size == 2
    rows = []
    for j, c in enumerate(cols):
        if c in _SKIP_COLUMNS or c.split(":")[-1].isdigit():
            continue
        r: dict[str, Any] = {"measurement": c,
                             "label_auc": float(roc_auc_score(y, means[:, j])) if two else float("nan"),
                             "median_reactive": float(np.median(means[y == 0, j])) if (y == 0).any() else float("nan"),
                             "median_malignant": float(np.median(means[y == 1, j])) if (y == 1).any() else float("nan"),
                             "score_spearman": float("nan")}
        if have and np.std(X[:, j]) > 0:
            r["score_spearman"] = float(spearmanr(X[:, j], s).statistic)
        rows.append(r)
    key = (lambda r: -abs(r["score_spearman"])) if have else (lambda r: -abs(r["label_auc"] - 0.5))
    return sorted(rows, key=lambda r: (np.isnan(key(r)), key(r)))[:TOP]


def coefficients_md(rows: list[dict[str, Any]], model: str) -> str:
    if not rows:
        return f"_{model} exposes no coefficients._"
    out = [(f"Standardised coefficients of **{model}** as fitted in each of the {rows[0]['folds']} "
           "training folds (change in log-odds of malignancy per standard deviation):"), "",
           "| input | mean | std across folds | folds with the same sign |", "|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['input']} | {r['mean']:+.2f} | {r['std']:.2f} | "
                   f"{100 * r['sign_agreement']:.0f}% |")
    return "\n".join(out)


def measurements_md(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_The store's features are not named measurements: no per-measurement view._"
    out = ["Named cell measurements, strongest first (patients scored out of fold only):", "",
           ("| measurement | label AUC of patient mean | median reactive | median malignant | "
           "Spearman with cell score |"), "|---|---|---|---|---|"]
    for r in rows:
        sp = "–" if np.isnan(r["score_spearman"]) else f"{r['score_spearman']:+.2f}"
        out.append(f"| {r['measurement']} | {r['label_auc']:.2f} | {r['median_reactive']:.3g} | "
                   f"{r['median_malignant']:.3g} | {sp} |")
    return "\n".join(out)
