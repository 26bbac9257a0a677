"""Estimators compared with the MIL head by ``lymph compare-baselines`` (and ``fit-head
--fusion late``). Every one follows the stage-two contract of :mod:`lymph.head.estimator`:
scikit-learn ``BaseEstimator``/``ClassifierMixin``, ``__init__`` stores parameters only,
``fit(store) -> self`` on the labelled patients of that store, ``predict_proba(store) ->
(n, 2)``, ``threshold_`` chosen on the fit patients only, seeded.

- :class:`AdaBoostClinical`: AdaBoost on the clinical features (the seed report's baseline).
- :class:`LogisticClinical`: L2 logistic regression on the standardised clinical features.
- :class:`MixtureOfExperts`: an attention-MIL image expert and an MLP clinical expert mixed
  by a linear gate (the report's section 3.4, after Sahasrabudhe et al. 2021).
- :class:`LateFusion`: the bag's pooled image score joins the clinical features in a
  regularised logistic regression (stacking; issue 9, stage two).

- :class:`BagStatsForest`, :class:`BagStatsBoosting`: trees on per-bag [mean, max, min]
  of the instances (+ clinical columns): the bag-statistics baseline of issue 17.

(The clinical MLP is ``MILClassifier(images=False)``.)

Threshold rule of the scikit-learn models: out-of-fold probabilities of an inner stratified
``inner_folds``-fold CV over the fit patients, then :func:`lymph.head.train.choose_threshold`
(max balanced accuracy, ties to 0.5); the final model is refitted on all fit patients.
The torch model (mixture of experts) uses the head's rule: an inner stratified validation
split for early stopping and the threshold.
"""
from lymph.baselines.bag_stats import BagStatsBoosting, BagStatsForest, bag_stats
from lymph.baselines.clinical import AdaBoostClinical, LogisticClinical
from lymph.baselines.common import bag_mean_quantile, native_threads
from lymph.baselines.late_fusion import LOGIT_COLUMNS, LateFusion, logit_column
from lymph.baselines.moe import MixtureOfExperts, MoENet

__all__ = ["AdaBoostClinical", "BagStatsBoosting", "BagStatsForest", "bag_stats", "LOGIT_COLUMNS", "LateFusion", "LogisticClinical",
           "MixtureOfExperts", "MoENet", "bag_mean_quantile", "native_threads", "logit_column"]
