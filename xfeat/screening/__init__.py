"""Screening models: a classifier with a recall-target threshold, its model file, prediction on raw images."""

from xfeat.screening.model import ScreeningModel, fit_model, load_model, save_model, train_model
from xfeat.screening.model_file import ModelFile, read_model_file, write_model_file
from xfeat.screening.predict import InputImage, Prediction, gather_inputs, predict, write_predictions
from xfeat.screening.threshold import ScreeningOutcome, recall_threshold, screening_outcome

__all__ = ["ScreeningModel", "fit_model", "load_model", "save_model", "train_model", "ModelFile",
           "read_model_file", "write_model_file", "InputImage", "Prediction", "gather_inputs", "predict",
           "write_predictions", "ScreeningOutcome", "recall_threshold", "screening_outcome"]
