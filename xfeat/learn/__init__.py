"""Learning on cached features: the classifiers (scikit-learn estimators, the fc head), metrics, and
leave-one-bundle-out evaluation."""

from xfeat.learn.binary import abnormal_score
from xfeat.learn.classifiers import CLASSIFIERS, KNNNormal, LinearSVM, LogReg, Mahalanobis, make_classifier
from xfeat.learn.evaluation import (Configuration, ConfigurationResult, configurations, evaluate,
                                    evaluate_configuration, leave_one_bundle_out)
from xfeat.learn.fc_head import FCHead
from xfeat.learn.metrics import Counts, auroc, bundle_bootstrap
from xfeat.learn.threads import one_thread

__all__ = ["abnormal_score", "CLASSIFIERS", "KNNNormal", "LinearSVM", "LogReg", "Mahalanobis", "make_classifier",
           "Configuration", "ConfigurationResult", "configurations", "evaluate", "evaluate_configuration",
           "leave_one_bundle_out", "FCHead", "Counts", "auroc", "bundle_bootstrap", "one_thread"]
