"""Montage of cell-composition prototypes (issue 18): what each k-means prototype of
:class:`lymph.baselines.composition.CompositionFusion` looks like, and how its share differs
between malignant and reactive patients.

    est = CompositionFusion(n_prototypes=8).fit(store)
    img, table = prototype_montage(store, est, PixelSource(store, cache))
    save_png(img, "prototypes.png")

Per prototype: the ``per`` cells nearest to its centre (labelled patients of the store),
the mean per-patient share of the prototype among malignant and among reactive patients,
and the prototype's coefficient in the fusion regression (standardised log proportion;
positive = more of it, more likely malignant).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lymph.baselines.composition import bag_proportions
from lymph.head.bags import instances_of


def prototype_table(store: Any, est: Any) -> list[dict[str, Any]]:
    """Per prototype: index, mean share among malignant / reactive labelled patients, the
    fusion coefficient."""
    rows = store.labelled()
    k = len(est.centres_)
    counts = bag_proportions(est._assign(store, rows), store.bag_sizes[rows], k)
    share = counts / store.bag_sizes[rows][:, None]
    y = store.labels[rows]
    coef = est.coefficients()
    return [{"prototype": j, "share_malignant": float(share[y == 1, j].mean()),
             "share_reactive": float(share[y == 0, j].mean()),
             "coefficient": coef[f"proto{j}"]} for j in range(k)]


def prototype_montage(store: Any, est: Any, source: Any, per: int = 8) -> tuple[Any, list[dict[str, Any]]]:
    """The montage (a PIL image) and :func:`prototype_table`."""
    from lymph.report.montage import montage_image

    rows = store.labelled()
    table = prototype_table(store, est)
    take = np.concatenate([np.arange(store.patient_ptr[r], store.patient_ptr[r + 1]) for r in rows])
    x = np.asarray(est.instance_scaler_.transform(
        instances_of(store.embeddings, store.patient_ptr, rows)), dtype=np.float64)
    cells, caps, sections = [], [], {}
    for t in table:
        j = t["prototype"]
        d = ((x - est.centres_[j]) ** 2).sum(1)
        nearest = np.argsort(d, kind="stable")[:per]
        sections[len(cells)] = (f"prototype {j}: share {t['share_malignant']:.1%} malignant vs "
                                f"{t['share_reactive']:.1%} reactive, coefficient "
                                f"{t['coefficient']:+.2f}")
        for i in nearest:
            cells.append(source.read(int(take[i])))
            caps.append(f"d={d[i]:.2f}")
    head = (f"{len(table)} cell prototypes (k-means on {store.dim} standardised features, "
            f"{rows.size} labelled patients)")
    title = [head, "nearest cells to each prototype centre"]
    return montage_image(cells, caps, title, ncols=per, section_titles=sections), table
