"""How much of a weak store's patient image score the clinical data already carry.

For each weak store (stage-one out-of-fold cell logits, as `lymph embed --method weak`
writes them for labelled patients): the patient ROC AUC of the mean cell logit; its
Spearman correlation with each clinical column; and the cross-validated ROC AUC of a
logistic regression on the clinical columns alone and with the image score added
(stratified 5-fold, seed 0; the image score is stacked, not nested: an upper bound of what
it adds). Issue 18, fourth pass; not a test.

    python benchmarks/image_clinical_overlap.py a.h5 b.h5 ...
"""

from __future__ import annotations

import json
import sys

import numpy as np


def overlap(path: str) -> dict:
    from scipy.stats import spearmanr
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from lymph.store import open_store

    s = open_store(path)
    lab = np.flatnonzero(s.labels >= 0)
    ptr = s.patient_ptr
    score = np.add.reduceat(s.embeddings[:, 0].astype(np.float64), ptr[:-1]) / np.diff(ptr)
    y, clin, img = s.labels[lab], s.clinical[lab].astype(np.float64), score[lab]
    cv = StratifiedKFold(5, shuffle=True, random_state=0)

    def cv_auc(x: np.ndarray) -> float:
        d = cross_val_predict(LogisticRegression(max_iter=1000), x, y, cv=cv,
                              method="decision_function")
        return round(float(roc_auc_score(y, d)), 3)

    return {"store": path, "image_auc": round(float(roc_auc_score(y, img)), 3),
            "spearman": {c: round(float(spearmanr(img, clin[:, j]).statistic), 3)
                         for j, c in enumerate(s.clinical_columns)},
            "clinical_auc": cv_auc(clin), "clinical_plus_image_auc": cv_auc(np.c_[clin, img])}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        sys.exit(2)
    for p in sys.argv[1:]:
        print(json.dumps(overlap(p)))
