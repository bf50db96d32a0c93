//! The study's statistics, pure and in f64: ROC curves and AUC, DeLong variance, confidence intervals and
//! paired tests, Youden cut-offs, decision-curve net benefit, Brier score and calibration, score histograms,
//! and logistic regression by Newton's method (shared by the clinical model and the server's federated Newton).
//!
//! Built by the metrics issue; checked against R pROC, scikit-learn, statsmodels and dcurves reference values.
