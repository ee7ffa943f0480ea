"""Tests of experiments.analysis, plots and ladder."""
